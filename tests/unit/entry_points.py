"""Running the package's commands and composing its configs as a user does, for the tests of
configs, cluster profiles, sweeps and packaging."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sparse_detr.config import config_dir, load_config, validate

REPO = Path(__file__).resolve().parents[2]
GROUPS = ["backbone", "model", "attention", "placement", "data", "optim", "schedule", "logger", "cluster", "experiment"]
# The environment the cluster profiles read; the tests that use them start without it (fixture
# `clean_cluster_env` in conftest.py).
CLUSTER_ENV = ("SPARSE_DETR_ACCOUNT", "SPARSE_DETR_PARTITION", "SPARSE_DETR_GPU_TYPE", "SPARSE_DETR_SETUP")


TRAIN = [sys.executable, "-m", "sparse_detr.train", "experiment=smoke", "train.progress=off"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def run(command, cwd, env=None, timeout=120):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_error_line(result) -> str:
    """The stderr of a run stopped by a user error: exit 2, one `error:` line, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


# What a data set needs from the user (paths); validation only checks that they are given.
DATA_NEEDS = {
    "coco": ["data.root=/data/coco"],
    "coco_format": ["data.train_images=/d/train", "data.train_annotations=/d/train.json",
                    "data.val_images=/d/val", "data.val_annotations=/d/val.json"],
}


def compose_valid(*overrides: str):
    cfg = load_config(list(overrides))
    needs = DATA_NEEDS.get(cfg.data.name, [])
    if needs:
        cfg = load_config([*overrides, *needs])
    return validate(cfg)
