"""Sweeps on the local SLURM test cluster through hydra-submitit-launcher (`cluster=local_slurm`):
every run of a grid ends with its metrics, a run signalled before its time limit checkpoints, is
requeued and finishes from its checkpoint in the same tracking run, and `sparse-detr-sweep status`
follows it all. Run with:

    python -m pytest -m slurm tests/integration/test_sweeps.py -p no:cacheprovider
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from slurm_sweeps import BASE, checkpoint_step, job_ids, sweep_process, sweep_status, wait_for_exit

from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.run_folder import CHECKPOINT_NAME
from sparse_detr.sweep.slurm import sbatch_script

pytestmark = pytest.mark.slurm


def sbatch_lines(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith("#SBATCH"))


def test_a_two_run_sweep_runs_on_the_cluster_as_the_profile_says(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    grid = ["attention=softmax,sparsemax", "placement=cross"]
    with sweep_process(slurm_cluster, tmp_path, sweep_dir, *grid) as process:
        wait_for_exit(slurm_cluster, process, tmp_path, timeout_s=240)

    runs = {"softmax-none-tiny-shapes/seed_42", "sparsemax-cross-tiny-shapes/seed_42"}  # softmax anywhere: the baseline
    for run in runs:
        metrics = json.loads((sweep_dir / run / "eval_metrics.json").read_text())
        assert metrics["epoch"] == 2 and metrics["global_step"] == 16 and "AP" in metrics
    # The launcher returns when the results are written; the jobs end a moment later.
    statuses = slurm_cluster.wait_until(
        lambda: (st := sweep_status(sweep_dir)) and all(s["scheduler"] == "COMPLETED" for s in st) and st,
        30, "sacct to say COMPLETED")
    assert {s["run"] for s in statuses} == runs
    assert all(s["state"] == "done" for s in statuses), statuses
    (array,) = {s["job"].split("_")[0] for s in statuses}
    assert sorted(s["job"] for s in statuses) == [f"{array}_0", f"{array}_1"]
    expected = {("COMPLETED", "sparse", "debug", "1")}
    slurm_cluster.wait_until(  # slurmdbd fills some fields a moment after the state
        lambda: {(r["State"], r["Account"], r["Partition"], r["AllocCPUS"])
                 for r in slurm_cluster.sacct(array, "JobID,State,Account,Partition,AllocCPUS")} == expected,
        30, f"sacct to show {expected}")
    # What `sparse-detr-sweep sbatch` shows is what the launcher submitted.
    (submitted,) = (sweep_dir / ".submitit").glob("*/*_submission.sh")
    preview = sbatch_script([*BASE, "attention=softmax", "placement=cross", f"hydra.sweep.dir={sweep_dir}"], num_jobs=2)
    assert sbatch_lines(submitted.read_text()) == sbatch_lines(preview)


def test_the_twelve_run_grid_runs_and_can_be_followed(slurm_cluster, tmp_path):
    """The grid of the README (4 mappings x 3 placements), one epoch each."""
    sweep_dir = tmp_path / "sweep"
    mappings, placements = ["softmax", "sparsemax", "entmax15", "alpha_entmax"], ["encoder", "decoder", "cross"]
    grid = [f"attention={','.join(mappings)}", f"placement={','.join(placements)}", "schedule.epochs=1"]
    seen_states: set[str] = set()
    with sweep_process(slurm_cluster, tmp_path, sweep_dir, *grid) as process:
        def finished() -> bool:
            if (sweep_dir / "sweep_runs.json").is_file():
                seen_states.update(s["state"] for s in sweep_status(sweep_dir))
            return process.poll() is not None
        slurm_cluster.wait_until(finished, 300, "the 12-run sweep to end", interval_s=3)
        assert process.returncode == 0, (tmp_path / "sweep.log").read_text()[-4000:]

    statuses = slurm_cluster.wait_until(
        lambda: (st := sweep_status(sweep_dir)) and all(s["scheduler"] == "COMPLETED" for s in st) and st,
        30, "sacct to say COMPLETED")
    # softmax at encoder, decoder or cross is one model, the baseline: trained once
    expected = {f"{m}-{p}-tiny-shapes+schedule.epochs=1/seed_42" for m in mappings[1:] for p in placements}
    expected.add("softmax-none-tiny-shapes+schedule.epochs=1/seed_42")
    assert {s["run"] for s in statuses} == expected
    assert all(s["state"] == "done" and s["epoch"] == 1 and s["ap"] is not None for s in statuses), statuses
    assert len({s["job"] for s in statuses}) == 10
    for run in expected:
        assert (sweep_dir / run / "eval_metrics.json").is_file() and (sweep_dir / run / "metrics.jsonl").is_file()
    assert "running" in seen_states or "pending" in seen_states, seen_states


def test_a_signalled_run_checkpoints_is_requeued_and_finishes_from_its_checkpoint(slurm_cluster, tmp_path):
    import submitit

    sweep_dir = tmp_path / "sweep"
    epochs, steps_per_epoch = 20, 8
    overrides = ["attention=softmax,sparsemax", "placement=cross", f"schedule.epochs={epochs}",
                 "logger=wandb", "logger.mode=offline"]
    run_dir = sweep_dir / f"softmax-none-tiny-shapes+schedule.epochs={epochs}/seed_42"
    with sweep_process(slurm_cluster, tmp_path, sweep_dir, *overrides) as process:
        slurm_cluster.wait_until(lambda: checkpoint_step(run_dir / CHECKPOINT_NAME) >= steps_per_epoch, 180,
                                 "the first checkpoint of the run")
        status = {s["run"]: s for s in sweep_status(sweep_dir)}
        job_id = status[str(run_dir.relative_to(sweep_dir))]["job"]
        assert status[str(run_dir.relative_to(sweep_dir))]["state"] == "running"
        # What SLURM sends before the time limit (USR2 only, as submitit's own tests do it).
        job = submitit.SlurmJob(folder=sweep_dir / ".submitit" / "%j", job_id=job_id)
        job._interrupt(timeout=True)

        states: list[str] = []

        def back_and_running() -> bool:
            state = slurm_cluster.state(job_id)
            if not states or states[-1] != state:
                states.append(state)
            return "resumed from" in (run_dir / "train.log").read_text()

        slurm_cluster.wait_until(back_and_running, 120, "the requeued run to resume", interval_s=0.5)
        assert {"REQUEUED", "PENDING"} & set(states), states
        wait_for_exit(slurm_cluster, process, tmp_path, timeout_s=240)

    log = (run_dir / "train.log").read_text()
    signalled = re.search(r"received SIGUSR2 at step (\d+): checkpoint saved", log)
    resumed = re.search(r"resumed from .* at epoch \d+, step (\d+)", log)
    assert signalled and resumed, log[-3000:]
    assert steps_per_epoch <= int(signalled.group(1)) == int(resumed.group(1)) < epochs * steps_per_epoch
    # Nothing lost, nothing repeated: the logged steps only go up, to the end.
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["global_step"] for row in lines if "train-main-metrics/loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == epochs * steps_per_epoch
    assert json.loads((run_dir / "eval_metrics.json").read_text())["epoch"] == epochs
    # The same W&B run continued: two offline segments with one run id.
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and len({s.name.rsplit("-", 1)[1] for s in segments}) == 1, segments
    assert load_training_checkpoint(run_dir / CHECKPOINT_NAME)["tracker_run_id"] == segments[0].name.rsplit("-", 1)[1]

    slurm_cluster.wait_until(lambda: slurm_cluster.state(job_id) == "COMPLETED", 30, "sacct to say COMPLETED")
    assert [r["State"] for r in slurm_cluster.sacct(job_id, duplicates=True)] == ["REQUEUED", "COMPLETED"]
    final = slurm_cluster.wait_until(
        lambda: (st := sweep_status(sweep_dir)) and all(s["state"] == "done" for s in st) and {s["run"]: s for s in st},
        30, "every run to be done")
    assert final[str(run_dir.relative_to(sweep_dir))]["requeues"] == 1


def test_a_requeued_run_started_with_resume_resumes_from_its_own_later_checkpoint(slurm_cluster, tmp_path):
    """Issue 13, case 1: `resume=` is where a new run starts; a requeue repeats the same command
    line, and must then resume from the checkpoint the run wrote since, not from the `resume=` file."""
    import submitit

    given_dir = tmp_path / "given"
    given = subprocess.run(
        [sys.executable, "-m", "sparse_detr.train", *BASE, "attention=softmax", "placement=cross",
         "train.max_steps=4", f"output_dir={given_dir}", f"hydra.run.dir={given_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert given.returncode == 0 and checkpoint_step(given_dir / CHECKPOINT_NAME) == 4, given.stderr[-3000:]

    sweep_dir = tmp_path / "sweep"
    epochs, steps_per_epoch, start = 20, 8, 4
    overrides = ["attention=softmax", "placement=cross", f"schedule.epochs={epochs}", f"train.eval_every={epochs}",
                 "train.log_every=1", "train.checkpoint_every=2", f"resume={given_dir / CHECKPOINT_NAME}"]
    run_dir = sweep_dir / f"softmax-none-tiny-shapes+schedule.epochs={epochs}/seed_42"  # every site softmax: the baseline
    with sweep_process(slurm_cluster, tmp_path, sweep_dir, *overrides) as process:
        # Its own checkpoint, well past the given one.
        slurm_cluster.wait_until(lambda: checkpoint_step(run_dir / CHECKPOINT_NAME) >= start + 6, 180,
                                 "the run's own checkpoint past step 10", interval_s=0.2)
        (job_id,) = job_ids(sweep_dir)
        submitit.SlurmJob(folder=sweep_dir / ".submitit" / "%j", job_id=job_id)._interrupt(timeout=True)
        slurm_cluster.wait_until(
            lambda: "resumed from" in (run_dir / "train.log").read_text().partition("received SIGUSR2")[2], 120,
            "the requeued run to resume", interval_s=0.5)
        wait_for_exit(slurm_cluster, process, tmp_path, timeout_s=240)

    log = (run_dir / "train.log").read_text()
    signalled = re.search(r"received SIGUSR2 at step (\d+): checkpoint saved", log)
    assert signalled, log[-3000:]
    signalled_step = int(signalled.group(1))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["global_step"] for row in rows if "train-main-metrics/loss" in row]
    assert steps[0] == start + 1, f"the new run did not start from the resume= file: {steps[:5]}"
    restarted_at = next((steps[i] for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    assert restarted_at is None, (
        f"signalled at step {signalled_step} (its own checkpoint), the requeued run started again at step "
        f"{restarted_at}: it resumed from the resume= file (step {start}), and trained steps "
        f"{restarted_at}..{signalled_step} twice")
    assert steps == list(range(start + 1, epochs * steps_per_epoch + 1))
    assert checkpoint_step(run_dir / CHECKPOINT_NAME) == epochs * steps_per_epoch
