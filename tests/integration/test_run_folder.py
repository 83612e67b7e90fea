"""Who owns a run folder, in real processes: its own checkpoint wins over `resume=`, two identical
starts cannot both train it, and an unreadable checkpoint stops a start in one line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.run_folder import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME

SMOKE = ["experiment=smoke", "train.progress=off", "logger=none"]


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sparse_detr.train", *SMOKE, f"output_dir={run_dir}",
            f"hydra.run.dir={run_dir}/hydra", *overrides]


def run(command, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def checkpoint_step(run_dir: Path) -> int:
    try:
        return load_training_checkpoint(run_dir / CHECKPOINT_NAME)["state"]["global_step"]
    except Exception:  # not written yet, or being replaced right now
        return -1


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while not predicate() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the test could interrupt it"


def logged_steps(run_dir: Path) -> list[int]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["global_step"] for line in lines if "train-main-metrics/loss" in line]


def test_a_restarted_run_resumes_from_its_own_checkpoint_not_from_resume(tmp_path):
    start = tmp_path / "start"
    first = run(train_command(start, "train.max_steps=4"), tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    command = train_command(tmp_path / "run", f"resume={start / CHECKPOINT_NAME}", "train.checkpoint_every=2",
                            "schedule.epochs=4")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: checkpoint_step(tmp_path / "run") >= 12, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_step(tmp_path / "run")
    assert 12 <= killed_at < 32

    again = run(command, tmp_path)  # the same command line, as a SLURM requeue repeats it
    assert again.returncode == 0, again.stderr[-2000:]
    output = again.stdout + again.stderr
    assert f"not from resume={start / CHECKPOINT_NAME}" in output
    assert f"resumed from {tmp_path / 'run' / CHECKPOINT_NAME} (the run folder's own checkpoint)" in output
    assert f"step {killed_at}" in output
    assert checkpoint_step(tmp_path / "run") == 32
    steps = logged_steps(tmp_path / "run")
    assert steps[0] == 6 and steps.count(6) == 1  # steps 5..killed_at were not trained a second time


def test_a_second_identical_start_stops_at_once_naming_the_holder_and_a_kill_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(run_dir, "schedule.epochs=400", "train.checkpoint_every=1")
    holder = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: checkpoint_step(run_dir) >= 1, holder)
        second = run(command, tmp_path, timeout=120)
        assert holder.poll() is None, "the first run must still hold the folder"
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: run folder ")
        assert str(run_dir) in lines[0] and f"pid {holder.pid} on " in lines[0]
        assert "Traceback" not in second.stdout + second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    steps = logged_steps(run_dir)
    assert len(steps) == len(set(steps)), "only one process wrote metrics.jsonl"
    reached = checkpoint_step(run_dir)
    after_kill = run(train_command(run_dir, "schedule.epochs=400", "train.checkpoint_every=1",
                                   f"train.max_steps={reached + 2}", "train.eval_every=1000"), tmp_path)
    assert after_kill.returncode == 0, after_kill.stderr[-2000:]
    assert checkpoint_step(run_dir) == reached + 2


def test_an_unreadable_checkpoint_stops_a_start_in_one_line_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(run_dir, "train.max_steps=4", "train.checkpoint_every=2")
    assert run(command, tmp_path).returncode == 0
    path = run_dir / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:5000])  # truncated, as by a full disk in a copy
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    result = run(command, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {path} is unreadable")
    assert f"mv {run_dir / PREVIOUS_CHECKPOINT_NAME} {path}" in lines[0]
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, "metrics.jsonl"):
        assert after[name] == before[name], name
