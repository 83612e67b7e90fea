"""`sparse-detr-study`: run a study (or resume it), or show the stage of each of its runs.

    sparse-detr-study study=shapes                         # this machine, runs in sequence
    sparse-detr-study study=where cluster=berzelius        # a SLURM sweep; run it again to resume
    sparse-detr-study study=thesis 'grid.seed=[42,1,2]' dir=/proj/studies/thesis
    sparse-detr-study status outputs/studies/where         # training / analysing / done / failed per run

The command waits for its runs (on SLURM: in a tmux or screen session, or run it again later:
it never launches a run twice and resumes what is unfinished). The config is conf/study.yaml
with a conf/study/ grid; StudyConfig in sparse_detr/study/config.py explains each key.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import hydra
from omegaconf import DictConfig

from sparse_detr.config import config_dir, reports_config_errors
from sparse_detr.errors import EXIT_USER_ERROR
from sparse_detr.study import config as _schema  # noqa: F401  (registers study_schema for conf/study.yaml)
from sparse_detr.study.stages import PLAN_NAME, format_stages, read_plan, study_stages


def status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sparse-detr-study status", description="the stage of every run of a study")
    parser.add_argument("study_dir", help="the study folder, e.g. outputs/studies/shapes")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    parser.add_argument("--no-sacct", action="store_true", help="judge from the run folders only")
    args = parser.parse_args(argv)
    study_dir = Path(args.study_dir).absolute()
    plan = read_plan(study_dir)
    if plan is None:
        print(f"error: {str(study_dir)!r} is not a study folder (no {PLAN_NAME}); "
              "start one with: sparse-detr-study study=<name>", file=sys.stderr)
        return EXIT_USER_ERROR
    notes: list[str] = []
    stages = study_stages(study_dir, [run["run"] for run in plan["runs"]], use_sacct=not args.no_sacct, notes=notes)
    if args.json:
        print("\n".join(json.dumps(asdict(stage)) for stage in stages))
    else:
        print("\n".join([f"study {plan['name']}: {study_dir}", format_stages(stages, study_dir),
                         *(f"note: {note}" for note in notes)]))
    return 0


@hydra.main(config_path=str(config_dir()), config_name="study", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> None:
    from sparse_detr.study.runner import run_study

    code = run_study(cfg, sys.argv)
    if code:
        sys.exit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        sys.exit(status(argv[1:]))
    _main()


if __name__ == "__main__":
    main()
