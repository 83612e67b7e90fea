"""The training entry point end to end, in real processes: run, kill -9, resume, compare."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.run_folder import CHECKPOINT_NAME

SMOKE = ["experiment=smoke", "train.checkpoint_every=1", "train.progress=off", "logger=none"]


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sparse_detr.train", *SMOKE, f"output_dir={run_dir}",
            f"hydra.run.dir={run_dir}/hydra", *overrides]


def run(command, cwd, timeout=300):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(run_dir: Path) -> dict:
    return load_training_checkpoint(run_dir / CHECKPOINT_NAME)["model"]


def checkpoint_step(run_dir: Path) -> int:
    try:
        return load_training_checkpoint(run_dir / CHECKPOINT_NAME)["state"]["global_step"]
    except Exception:  # not written yet, or being replaced right now
        return -1


def test_default_entry_point_trains_evaluates_and_reports(tmp_path):
    result = run(train_command(tmp_path / "run"), tmp_path)
    metrics = json.loads(result.stdout.strip().splitlines()[-2])
    assert {"AP", "AP50", "AR100"} <= metrics.keys()
    assert f"run folder: {tmp_path / 'run'}" in result.stdout
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "eval_metrics.json").read_text())
    assert saved["global_step"] == 16 and saved["epoch"] == 2
    assert (run_dir / "config.yaml").is_file() and "experiment=smoke" in (run_dir / "command.txt").read_text()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val-epoch-metrics/AP" in line for line in lines)
    assert any("sparsity/cross/layer_1/zero_ratio" in line for line in lines)
    # the grid metrics: at the sites whose keys are the feature map, and no value (not 0) elsewhere
    logged = {key for line in lines for key in line}
    for site in ("encoder", "cross"):
        assert {f"sparsity/{site}/layer_1/regions", f"sparsity/{site}/layer_1/largest_region_share"} <= logged
    assert not {key for key in logged if key.startswith("sparsity/decoder/") and "region" in key}
    softmax_regions = [line["sparsity/cross/layer_0/regions"] for line in lines if "sparsity/cross/layer_0/regions" in line]
    assert softmax_regions and all(value == 1.0 for value in softmax_regions)  # dense maps: one region


def test_a_learned_lambda_run_logs_every_head_and_layer(tmp_path):
    run_dir = tmp_path / "run"
    run(train_command(run_dir, "attention=tvmax", "placement=cross", "attention.learn_lambda=true",
                      "attention.impl=eager", "train.log_every=1", "train.max_steps=2"), tmp_path)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {key for line in lines for key in line}
    assert {key for key in logged if key.startswith("lambda/")} == {
        f"lambda/cross/layer_{l}/head_{h}" for l in range(2) for h in range(4)}
    assert "train-extra-metrics/lr_alpha" in logged   # lambdas train in the mapping (alpha) group


def test_sigkill_then_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    overrides = ["attention=alpha_entmax", "placement=cross", "attention.impl=eager", "model.dropout=0.1"]
    run(train_command(straight, *overrides), tmp_path)

    process = subprocess.Popen(train_command(killed, *overrides), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while checkpoint_step(killed) < 6 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = checkpoint_step(killed)
    assert 6 <= interrupted_at < 16, f"killed at step {interrupted_at}: the run should have been interrupted mid-way"

    run(train_command(killed, *overrides), tmp_path)
    assert checkpoint_step(killed) == 16
    expected, resumed = weights(straight), weights(killed)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    # The epoch means too: the running sums were in the checkpoint, not only the post-resume steps.
    assert epoch_means(killed) == epoch_means(straight) and len(epoch_means(straight)) == 2


def epoch_means(run_dir: Path) -> dict[int, dict[str, float]]:
    """{epoch: train-epoch-main-metrics/*} from metrics.jsonl; a line logged again wins."""
    means = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        values = {k: v for k, v in row.items() if k.startswith("train-epoch-main-metrics/")}
        if values:
            means[row["epoch"]] = values
    return means


def test_a_bad_value_fails_before_any_work_with_the_valid_choices(tmp_path):
    result = subprocess.run(train_command(tmp_path / "bad", "attention.alpha=2.5"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "attention.alpha=2.5" in result.stderr and "(1.0, 2.0]" in result.stderr
    assert not (tmp_path / "bad" / CHECKPOINT_NAME).exists()

    result = subprocess.run(train_command(tmp_path / "bad", "attention=sparsmax"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "sparsemax" in result.stderr


ATOMIC_WRITER = """
import sys, torch
from sparse_detr.engine.checkpoint import atomic_save
path = sys.argv[1]
for version in range(1, 10_000):
    atomic_save({"version": version, "payload": torch.full((8_000_000,), float(version))}, path)
    print(version, flush=True)
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    path = tmp_path / "checkpoint.pth"
    writer = subprocess.Popen([sys.executable, "-c", ATOMIC_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let a few saves complete, then kill in the middle of the next ones
        writer.stdout.readline()
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["version"] >= 3
    assert torch.all(checkpoint["payload"] == checkpoint["version"])
