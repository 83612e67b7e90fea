"""`sparse-detr-study`: from a grid of runs to the report, in one command that can be run again.

    config.py   the study's schema (conf/study.yaml, conf/study/*.yaml) and its runs, one per grid point
    stages.py   the stage of every run: pending, training, analysing, done, failed, stopped
    runner.py   validate every run, launch what is unfinished, then write the report
    command.py  the console script: `sparse-detr-study [overrides]`, `sparse-detr-study status DIR`
"""
from sparse_detr.study.command import main

__all__ = ["main"]
