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

from sparse_detr.config import ConfigError, hydra_message, load_config
from sparse_detr.errors import EXIT_USER_ERROR, UserError, one_line
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


def run(overrides: Sequence[str]) -> int:
    """Compose conf/study.yaml with `overrides` and run the study; a user error is one line and exit 2."""
    from sparse_detr.study.runner import run_study

    try:
        try:
            cfg = load_config(list(overrides), "study")
        except Exception as error:  # a misspelt study or cluster, a malformed value: Hydra's words
            raise ConfigError(hydra_message(error)) from None
        return run_study(cfg, ["sparse-detr-study", *overrides])
    except UserError as error:
        print(one_line(error), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    sys.exit(status(argv[1:]) if argv[:1] == ["status"] else run(argv))


if __name__ == "__main__":
    main()
