"""Shared fixtures: the real Hydra config, composed with overrides and shrunk for CPU tests."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# The smallest complete model: the `smoke` recipe with a fixed class count (no data set needed).
SMOKE = ["experiment=smoke", "model.num_classes=5"]


@pytest.fixture
def compose():
    """compose(*overrides) -> the project's config with the smoke recipe and the overrides applied."""
    from sparse_detr import load_config

    def _compose(*overrides: str):
        return load_config([*SMOKE, *overrides])

    return _compose
