"""A real training run logged to W&B offline, killed off at a step limit and resumed."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from wandb_reader import read_wandb_run

import sparse_detr
from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.run_folder import CHECKPOINT_NAME


def train(run_dir, max_steps):
    command = [sys.executable, "-m", "sparse_detr.train", "experiment=smoke", "logger=wandb", "logger.mode=offline",
               "attention=alpha_entmax", "placement=cross", "attention.impl=eager", "train.log_every=1",
               "train.progress=off", f"train.max_steps={max_steps}", f"output_dir={run_dir}",
               f"hydra.run.dir={run_dir}/hydra"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(run_dir)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_resumed_training_continues_the_same_wandb_run_and_global_step(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, max_steps=4)
    first_id = load_training_checkpoint(run_dir / CHECKPOINT_NAME)["tracker_run_id"]
    train(run_dir, max_steps=8)
    assert load_training_checkpoint(run_dir / CHECKPOINT_NAME)["tracker_run_id"] == first_id

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{first_id}.wandb" for f in files)
    runs = [read_wandb_run(f) for f in files]
    steps = [row["global_step"] for run in runs for row in run["history"] if "global_step" in row]
    assert steps == sorted(steps) and steps[0] == 1 and steps[-1] == 8
    assert runs[0]["metrics"]["train-main-metrics/*"] == "global_step"
    assert runs[0]["metrics"]["val-epoch-metrics/*"] == "epoch"
    assert runs[0]["run"].run_group == runs[1]["run"].run_group == "alpha_entmax-cross-tiny-shapes+attention.impl=eager"
    assert runs[0]["run"].display_name == "alpha_entmax-cross-tiny-shapes+attention.impl=eager/seed_42"
    logged = {key for run in runs for row in run["history"] for key in row}
    alphas = {key for key in logged if key.startswith("alpha/cross/")}
    assert alphas == {f"alpha/cross/layer_{l}/head_{h}" for l in range(2) for h in range(4)}
    assert {"train-main-metrics/loss", "train-main-metrics/class_error", "train-metrics/loss_ce_0",
            "train-extra-metrics/lr_alpha", "val-epoch-metrics/AP50", "sparsity/cross/layer_1/zero_ratio"} <= logged

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    jsonl_steps = [line["global_step"] for line in lines if "global_step" in line and "train-main-metrics/loss" in line]
    assert jsonl_steps == list(range(1, 9))

    # provenance: both starts recorded in the run folder, and each in its W&B segment's config
    source = Path(sparse_detr.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = head.stdout.strip() if head.returncode == 0 and (source / ".git").exists() else None
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert len(provenance["earlier"]) == 1
    for start in (provenance, provenance["earlier"][0], *(run["config"]["provenance"] for run in runs)):
        assert start["git_commit"] == commit and isinstance(start["git_dirty"], bool) == (commit is not None)
        assert start["python"] == platform.python_version() and start["torch"] == torch.__version__
        assert start["cuda"] == torch.version.cuda and start["host"]
