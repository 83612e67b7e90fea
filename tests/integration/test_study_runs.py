"""`sparse-detr-study study=smoke` end to end: every run trained, then analysed by its own job,
the report written; run again, it redoes nothing that is done and finishes what is not. Locally
(in the default suite) and on the local SLURM cluster (`-m slurm`)."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_sweeps import job_ids

from sparse_detr.run_folder import ANALYSIS_NAME, CHECKPOINT_NAME, COMMAND_NAME, LOCK_NAME, analysis_dir

RUNS = ["softmax-none-tiny-shapes/seed_0", "sparsemax-cross-tiny-shapes/seed_0"]
QUICK = {"SPARSE_DETR_COMPILE": "0", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}  # (compiling takes longer than these runs)


def study(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparse_detr.study", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **QUICK})


def stages(study_dir: Path) -> dict[str, str]:
    result = study(study_dir.parent, "status", "--json", str(study_dir), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return {row["run"]: row["stage"] for row in map(json.loads, result.stdout.splitlines())}


def starts(run_dir: Path) -> int:
    """How many processes have started training in the run folder (one line of command.txt each)."""
    return len((run_dir / COMMAND_NAME).read_text().splitlines())


def check_done(study_dir: Path) -> None:
    for run in RUNS:
        analysis = json.loads((analysis_dir(study_dir / "runs" / run) / ANALYSIS_NAME).read_text())
        assert analysis["epoch"] == 2 and analysis["num_images"] == 8
    report = (study_dir / "report" / "report.md").read_text()
    assert "| sparsemax | cross |" in report and "| softmax | none |" in report
    assert (study_dir / "report" / "report.csv").is_file()
    assert list((study_dir / "report" / "figures").glob("*.png"))


def test_a_study_runs_every_stage_here_and_resumes_without_redoing_anything(tmp_path):
    study_dir = tmp_path / "study"
    first = study(tmp_path, "study=smoke", f"dir={study_dir}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    check_done(study_dir)
    assert stages(study_dir) == dict.fromkeys(RUNS, "done")

    # One run lost its analysis: it is analysed again from its checkpoint, nothing is retrained.
    runs = {run: study_dir / "runs" / run for run in RUNS}
    (analysis_dir(runs[RUNS[1]]) / ANALYSIS_NAME).unlink()
    assert stages(study_dir)[RUNS[1]] == "stopped"
    checkpoints = {run: (path / CHECKPOINT_NAME).stat().st_mtime_ns for run, path in runs.items()}
    started = {run: starts(path) for run, path in runs.items()}
    again = study(tmp_path, "study=smoke", f"dir={study_dir}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 runs done, 1 to run" in again.stdout
    assert starts(runs[RUNS[0]]) == started[RUNS[0]]               # the done run was not started
    assert starts(runs[RUNS[1]]) == started[RUNS[1]] + 1
    assert {run: (path / CHECKPOINT_NAME).stat().st_mtime_ns for run, path in runs.items()} == checkpoints
    check_done(study_dir)
    assert "2 runs: 2 done" in study(tmp_path, "status", str(study_dir), timeout=120).stdout

    # A process that holds a run folder (training or analysing there) stops a relaunch before it launches anything.
    (analysis_dir(runs[RUNS[1]]) / ANALYSIS_NAME).unlink()
    with open(runs[RUNS[1]] / LOCK_NAME, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert stages(study_dir)[RUNS[1]] == "analysing"
        busy = study(tmp_path, "study=smoke", f"dir={study_dir}")
    assert busy.returncode == 2 and "still queued or running" in busy.stderr, busy.stderr[-3000:]
    assert starts(runs[RUNS[1]]) == started[RUNS[1]] + 1


@pytest.mark.slurm
def test_a_study_on_the_slurm_cluster_trains_and_analyses_in_the_jobs_and_resumes(slurm_cluster, tmp_path):
    study_dir = tmp_path / "study"
    first = study(tmp_path, "study=smoke", "cluster=local_slurm", f"dir={study_dir}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    check_done(study_dir)
    submitted = job_ids(study_dir / "runs")
    assert len({job.split("_")[0] for job in submitted}) == 1 and len([j for j in submitted if "_" in j]) == 2  # one array
    slurm_cluster.wait_until(lambda: stages(study_dir) == dict.fromkeys(RUNS, "done"), 60, "both runs to be done")

    again = study(tmp_path, "study=smoke", "cluster=local_slurm", f"dir={study_dir}")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 runs done, 0 to run" in again.stdout
    assert job_ids(study_dir / "runs") == submitted    # nothing submitted again
