"""Sweeps of `sparse-detr-train -m ... cluster=local_slurm` in a background process, for the slurm
tests: the launcher blocks until every job has ended, so each sweep runs in a process that the test
polls (and ends, with its jobs, if the test fails)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from sparse_detr.engine.checkpoint import load_training_checkpoint

BASE = ["experiment=smoke", "cluster=local_slurm", "train.progress=off"]


@contextlib.contextmanager
def sweep_process(slurm_cluster, cwd: Path, sweep_dir: Path, *overrides: str) -> Iterator[subprocess.Popen]:
    """`sparse-detr-train -m ...` in the background; on the way out, whatever happened, it is
    stopped and the jobs it submitted are cancelled."""
    log = open(cwd / "sweep.log", "w")
    command = [sys.executable, "-m", "sparse_detr.train", "-m", *BASE, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield process
    except BaseException:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for job_id in job_ids(sweep_dir):  # (the launcher returns as soon as results are written;
            slurm_cluster.run("scancel", job_id, check=False)  # jobs still finishing are left alone)
        raise
    finally:
        log.close()


def job_ids(sweep_dir: Path) -> list[str]:
    folder = sweep_dir / ".submitit"
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)) if folder.is_dir() else []


def wait_for_exit(slurm_cluster, process: subprocess.Popen, cwd: Path, timeout_s: float) -> None:
    slurm_cluster.wait_until(lambda: process.poll() is not None, timeout_s, "the sweep to end")
    assert process.returncode == 0, (cwd / "sweep.log").read_text()[-4000:]


def sweep_status(sweep_dir: Path) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "sparse_detr.sweep", "status", "--json", str(sweep_dir)],
                            capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def checkpoint_step(path: Path) -> int:
    try:
        return load_training_checkpoint(path)["state"]["global_step"]
    except Exception:  # not there yet, or being replaced
        return -1
