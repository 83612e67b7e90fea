"""The local SLURM test cluster works the way the training sweeps need it to.

submitit submits, reads states through sacct, requeues a preempted Checkpointable job which then
resumes from its own saved progress, runs several one-CPU jobs at once, and `--gpus` requests are
accepted (fake GPUs). Run with:

    python -m pytest -m slurm tests/integration/test_slurm_cluster.py -p no:cacheprovider
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

pytestmark = pytest.mark.slurm

# The jobs unpickle the callables below in a fresh interpreter that cannot import this test
# module (pytest put its folder on sys.path, the job's Python does not have it): ship them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a: int, b: int) -> dict:
    env = os.environ
    return {"sum": a + b, "job_id": env.get("SLURM_JOB_ID"), "partition": env.get("SLURM_JOB_PARTITION")}


def sleep_and_stamp(index: int, sleep_s: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(sleep_s)
    return start, time.time()


class StepCounter(submitit.helpers.Checkpointable):
    """Counts to ``n_steps``, one step per ``step_s`` seconds, saving progress after every step.

    Like training, it resumes from its own folder: ``checkpoint()`` (inherited) resubmits the same
    call unchanged, and the call reads ``progress.txt``. Each start appends its first step to
    ``starts.txt`` so the test can see where every run began.
    """

    def __call__(self, workdir: str, n_steps: int, step_s: float) -> dict:
        work = Path(workdir)
        progress = work / "progress.txt"
        step = int(progress.read_text()) if progress.exists() else 0
        with open(work / "starts.txt", "a") as starts:
            starts.write(f"{step}\n")
        while step < n_steps:
            time.sleep(step_s)
            step += 1
            tmp = work / "progress.tmp"
            tmp.write_text(str(step))
            tmp.replace(progress)  # atomic: a run killed mid-write never leaves a torn file
        return {
            "steps": step,
            "starts": [int(s) for s in (work / "starts.txt").read_text().split()],
            "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
        }


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _read_starts(path: Path) -> list[int]:
    try:
        return [int(s) for s in path.read_text().split()]
    except FileNotFoundError:
        return []


def test_submitit_job_completes_and_sacct_reports_it(slurm_cluster, tmp_path: Path) -> None:
    executor = slurm_cluster.executor(tmp_path, slurm_account=slurm_cluster.account)
    job = executor.submit(add, 2, 3)

    slurm_cluster.wait_done(job, timeout_s=60)
    result = job.result()  # done, so this returns at once
    assert result == {"sum": 5, "job_id": job.job_id, "partition": "debug"}

    # submitit reads states through sacct: without accounting this stays UNKNOWN forever.
    slurm_cluster.wait_until(
        lambda: job.get_info(mode="force").get("State") == "COMPLETED", 30, "sacct to say COMPLETED"
    )
    assert job.state == "COMPLETED"
    # slurmdbd fills some fields (Partition) a moment after the state: wait for the whole row.
    expected = [{"State": "COMPLETED", "Account": "sparse", "Partition": "debug", "AllocCPUS": "1"}]
    slurm_cluster.wait_until(
        lambda: slurm_cluster.sacct(job.job_id, "State,Account,Partition,AllocCPUS") == expected,
        30, f"sacct to show {expected}",
    )


def test_three_one_cpu_jobs_run_at_once(slurm_cluster, tmp_path: Path) -> None:
    executor = slurm_cluster.executor(tmp_path, slurm_array_parallelism=3)
    jobs = executor.map_array(sleep_and_stamp, range(3), [5.0] * 3)

    for job in jobs:
        slurm_cluster.wait_done(job, timeout_s=60)
    intervals = [job.result() for job in jobs]
    latest_start = max(start for start, _ in intervals)
    earliest_end = min(end for _, end in intervals)
    assert latest_start < earliest_end, f"the three jobs did not overlap: {intervals}"


def test_signalled_checkpointable_job_is_requeued_and_resumes(slurm_cluster, tmp_path: Path) -> None:
    n_steps, step_s = 12, 1.0
    work = tmp_path / "work"
    work.mkdir()
    progress, starts = work / "progress.txt", work / "starts.txt"
    executor = slurm_cluster.executor(tmp_path / "submitit")
    job = executor.submit(StepCounter(), str(work), n_steps, step_s)

    slurm_cluster.wait_until(lambda: _read_int(progress) >= 3, 60, "the first run to make 3 steps")
    # The signal SLURM sends before the time limit (sbatch --signal=USR2@90): the job calls
    # checkpoint() and `scontrol requeue`s itself. Not `_interrupt()` (preemption): its SIGTERM and
    # USR2 go out in two scancel calls whose delivery order is not fixed; a SIGTERM arriving after
    # USR2 kills the job's own `scontrol requeue` child (every process of the step is signalled).
    job._interrupt(timeout=True)
    step_at_interrupt = _read_int(progress)

    states_seen: list[str] = []

    def second_run_started() -> bool:
        state = slurm_cluster.state(job.job_id)
        if not states_seen or states_seen[-1] != state:
            states_seen.append(state)
        return len(_read_starts(starts)) >= 2

    slurm_cluster.wait_until(second_run_started, 90, "the requeued job to start again", interval_s=0.5)
    print("sacct states after the signal:", states_seen)
    assert {"REQUEUED", "PENDING"} & set(states_seen), f"never saw the job requeued/pending: {states_seen}"
    slurm_cluster.wait_until(
        lambda: slurm_cluster.state(job.job_id) in {"RUNNING", "COMPLETED"}, 30, "the second run to be RUNNING"
    )

    slurm_cluster.wait_done(job, timeout_s=60)
    result = job.result()
    first, second = result["starts"]
    assert first == 0
    assert step_at_interrupt <= second < n_steps, "the second run did not resume from the saved progress"
    assert result["steps"] == n_steps
    assert result["restart_count"] == "1"
    # Accounting keeps both runs: the signalled one as REQUEUED, the last as COMPLETED.
    slurm_cluster.wait_until(lambda: slurm_cluster.state(job.job_id) == "COMPLETED", 30, "sacct to say COMPLETED")
    runs = [row["State"] for row in slurm_cluster.sacct(job.job_id, duplicates=True)]
    assert runs == ["REQUEUED", "COMPLETED"], runs


@pytest.mark.parametrize("gpu_option", ["--gpus=1", "--gres=gpu:1", "--gpus-per-node=1"])
def test_sbatch_asking_for_one_gpu_is_accepted(slurm_cluster, tmp_path: Path, gpu_option: str) -> None:
    job_id = slurm_cluster.sbatch(
        gpu_option, "-p", slurm_cluster.partition, "-A", slurm_cluster.account,
        "-o", str(tmp_path / "%j.out"), "--wrap", "true",
    )
    assert slurm_cluster.wait_finished(job_id, timeout_s=60) == "COMPLETED"
    slurm_cluster.wait_until(
        lambda: "gres/gpu=1" in slurm_cluster.sacct(job_id, "AllocTRES")[0]["AllocTRES"],
        30, "sacct to show gres/gpu=1",
    )


def visible_gpus() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_submitit_job_with_one_gpu_per_node(slurm_cluster, tmp_path: Path) -> None:
    """What the Hydra launcher's `gpus_per_node` asks for; the job sees one (fake) GPU."""
    job = slurm_cluster.executor(tmp_path, gpus_per_node=1).submit(visible_gpus)
    slurm_cluster.wait_done(job, timeout_s=60)
    fake_devices = sorted((slurm_cluster.slurm_conf.parent.parent / "dev").glob("gpu*"))
    if fake_devices and all(d.is_char_device() for d in fake_devices):
        # With device nodes as File= slurmd numbers the GPUs and exports them like real ones.
        assert job.result() in {"0", "1"}
    else:
        job.result()  # plain files (no mknod here): accepted, but no CUDA_VISIBLE_DEVICES
    slurm_cluster.wait_until(
        lambda: "gres/gpu=1" in slurm_cluster.sacct(job.job_id, "AllocTRES")[0]["AllocTRES"],
        30, "sacct to show gres/gpu=1",
    )


def test_sbatch_asking_for_more_gpus_than_the_node_has_is_rejected(slurm_cluster) -> None:
    """The fake GPUs are real GRES: requests are counted, not ignored."""
    rejected = slurm_cluster.run("sbatch", "--gpus=3", "-o", "/dev/null", "--wrap", "true", check=False)
    assert rejected.returncode != 0
    assert "Requested node configuration is not available" in rejected.stderr
