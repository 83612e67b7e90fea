"""A `sparse-detr-train` checkpoint back as a model: what eval, analyze and predict start from.

The model is rebuilt from the config saved in the checkpoint (with optional dotlist overrides)
and the weights are loaded with `weights_only`; nothing read from disk is executed.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sparse_detr.config import ConfigError, TrainConfig, validate
from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.models.detr import build_model, resolve_num_classes

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    cfg: DictConfig           # the run's config (with any overrides)
    model: torch.nn.Module    # in eval mode, on the requested device
    criterion: torch.nn.Module
    postprocessor: torch.nn.Module
    state: dict               # the training state saved with it: epoch, global_step, ...
    categories: list[dict]    # per label {"id": category id, "name": class name}
    checked: TrainConfig      # `cfg` validated: typed sub-configs (e.g. `checked.data` for the data set)


def load_trained_model(checkpoint: str | Path, overrides: Sequence[str] = (),
                       device: str | torch.device = "cpu", command: str = "this command") -> TrainedModel:
    """A `sparse-detr-train` checkpoint -> the model rebuilt from the checkpoint's saved config.

    `overrides` (dotlist, e.g. "data.root=/data/coco") change that config first, for a data set
    that moved or a smaller batch. `command` (the program asking) is named when the checkpoint
    holds weights only.
    """
    saved = load_training_checkpoint(checkpoint)
    if not saved.get("config") or "model" not in saved:
        raise ConfigError(f"checkpoint={str(checkpoint)!r} holds no saved config and model; "
                          f"{command} needs a checkpoint written by sparse-detr-train")
    try:
        changes = OmegaConf.from_dotlist(list(overrides))
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved["config"], changes)
    except Exception as error:  # an unknown key or a badly typed value
        raise ConfigError(f"overrides={list(overrides)}: {error}") from error
    checked = validate(cfg)
    model, criterion, postprocessor = build_model(cfg)
    model.load_state_dict(saved["model"])
    categories = saved.get("categories") or unnamed_categories(resolve_num_classes(cfg), checkpoint)
    return TrainedModel(cfg, model.to(device).eval(), criterion.to(device), postprocessor, saved.get("state", {}),
                        categories, checked)


def unnamed_categories(num_classes: int, checkpoint) -> list[dict]:
    """Checkpoints written before class names were saved: label i is category i, named "class i"."""
    log.warning("checkpoint %s stores no class names (written by an older version); naming classes by label",
                checkpoint)
    return [{"id": label, "name": f"class {label}"} for label in range(num_classes)]
