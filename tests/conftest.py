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


@pytest.fixture
def write_checkpoint():
    """write_checkpoint(cfg, path, categories=None) -> a model built from cfg (seed 0, eval mode),
    saved as `sparse-detr-train` saves it (weights, resolved config, class names): no training."""
    import torch
    from omegaconf import OmegaConf

    from sparse_detr.engine.checkpoint import atomic_save
    from sparse_detr.models.detr import build_model

    def _write(cfg, path, categories=None):
        torch.manual_seed(0)
        model = build_model(cfg)[0].eval()
        saved = {"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}
        if categories is not None:
            saved["categories"] = categories
        atomic_save(saved, path)
        return model

    return _write
