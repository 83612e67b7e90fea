"""`sparse-detr-sweep`: follow the runs of a sweep, or see the sbatch script a cluster profile submits.

    sparse-detr-sweep status outputs/sweeps/smoke            # one line per run: state, epoch, AP
    sparse-detr-sweep status outputs/sweeps/smoke --watch 30 # the same, every 30 s
    sparse-detr-sweep sbatch cluster=berzelius               # the sbatch script a profile submits
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from sparse_detr.errors import EXIT_USER_ERROR as EXIT_INVALID
from sparse_detr.config import hydra_message
from sparse_detr.sweep.slurm import sbatch_script
from sparse_detr.sweep.status import format_table, sweep_status

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-detr-sweep", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="every run of a sweep: state, epoch, step, latest AP")
    status.add_argument("sweep_dir", help="the sweep folder, e.g. outputs/sweeps/<experiment>")
    status.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted")
    status.add_argument("--no-sacct", action="store_true", help="judge from the run folders only")
    sbatch = commands.add_parser("sbatch", help="print the sbatch script a cluster profile submits (nothing is submitted)")
    sbatch.add_argument("overrides", nargs="*", help="config overrides, e.g. cluster=berzelius hydra.launcher.nodes=2")
    sbatch.add_argument("--jobs", type=int, default=1, help="number of runs (a job array above 1)")
    args = parser.parse_args(argv)

    if args.command == "sbatch":
        try:
            print(sbatch_script(args.overrides, args.jobs))
        except Exception as error:
            print(f"error: {hydra_message(error)}", file=sys.stderr)
            return EXIT_INVALID
        return 0

    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: no sweep folder {str(sweep_dir)!r}", file=sys.stderr)
        return EXIT_INVALID
    while True:
        notes: list[str] = []
        statuses = sweep_status(sweep_dir, use_sacct=not args.no_sacct, notes=notes)
        if args.json:
            output = "\n".join(json.dumps(asdict(s)) for s in statuses)
        else:
            output = "\n".join([str(sweep_dir.absolute()), format_table(statuses), *(f"note: {n}" for n in notes)])
        if args.watch:
            print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + output, flush=True)
            try:
                time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0
            continue
        print(output)
        return 0


if __name__ == "__main__":
    sys.exit(main())
