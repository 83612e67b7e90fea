"""Time the default job (`sparse-detr-train` with no arguments) and report its AP50.

    python -m sparse_detr.bench.default_run [--output-dir DIR] [override ...]

Runs the real entry point in a fresh process (the shapes data set is generated beforehand and
not timed), then prints the wall time, the AP50 of the held-out split and the AP50 after each
evaluation, so the learning curve shows how the goal was reached.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparse_detr.config import load_config
from sparse_detr.data import build_dataset
from sparse_detr.run_folder import EVAL_METRICS_NAME, read_json, read_metrics_log


def learning_curve(run_dir: Path) -> list[tuple[int, int, float, float]]:
    """(epoch, seconds since start, AP50, AP) of every evaluation logged in metrics.jsonl."""
    rows = read_metrics_log(run_dir)
    start = rows[0]["time"]
    return [(row["epoch"], round(row["time"] - start), row["val-epoch-metrics/AP50"], row["val-epoch-metrics/AP"])
            for row in rows if "val-epoch-metrics/AP50" in row]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=None, help="run folder (default: a new temporary one)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to sparse-detr-train")
    args = parser.parse_args(argv)
    run_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="sparse_detr_bench_"))

    build_dataset(load_config(args.overrides).data, "val")  # generates the data set, untimed

    command = [sys.executable, "-m", "sparse_detr.train", *args.overrides, f"output_dir={run_dir}",
               f"hydra.run.dir={run_dir}/hydra", "train.progress=off"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start

    metrics = read_json(run_dir / EVAL_METRICS_NAME)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"command: sparse-detr-train {' '.join(args.overrides)}")
    print(f"wall time: {wall / 60:.1f} min   AP50: {metrics['AP50']:.3f}   AP: {metrics['AP']:.3f}")
    print("| epoch | minutes | AP50 | AP |\n|---|---|---|---|")
    for epoch, seconds, ap50, ap in learning_curve(run_dir):
        print(f"| {epoch} | {seconds / 60:.1f} | {ap50:.3f} | {ap:.3f} |")
    print(f"run folder: {run_dir}")


if __name__ == "__main__":
    main()
