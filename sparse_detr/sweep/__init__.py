"""Sweeps: every run checked before anything is launched, and `sparse-detr-sweep` to follow them.

    compose.py     the runs of a `-m` sweep, composed as the launcher will (shared by the others)
    validation.py  `ValidateSweep`, the Hydra callback conf/train.yaml registers
    manifest.py    `<sweep dir>/sweep_runs.json`: the runs a launch validated
    slurm.py       the sbatch script of a cluster profile; job states from sacct and submitit
    status.py      `sparse-detr-sweep status`: state, progress and latest AP of every run
    command.py     `sparse-detr-sweep` (the console script calls `sparse_detr.sweep:main`)
"""
from sparse_detr.sweep.command import main
from sparse_detr.sweep.validation import ValidateSweep   # the callback's path in conf/train.yaml

__all__ = ["ValidateSweep", "main"]
