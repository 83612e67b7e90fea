"""Each default lives in one place, and the recipes compose exactly as before the model group.

A group's YAML file that repeats a schema default would silently override a changed default; the
composed configs of the recipes (and of the backbones, alone and with `experiment=smoke`) and
their run folder names are compared with what they were when the model sizes were set by
backbone/tiny.yaml (tests/unit/composed_configs.json, composed then).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sparse_detr import naming
from sparse_detr.config import TrainConfig, config_dir
from sparse_detr.sweep.compose import compose_with_hydra, job_config

EXPECTED = json.loads((Path(__file__).with_name("composed_configs.json")).read_text())
# Recipes on purpose: a placement says what runs at every site, whatever the schema's default, and
# an experiment may set a value back to the schema's over what its groups chose.
RECIPE_GROUPS = ("placement", "experiment")


def flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def group_values(path: Path) -> dict:
    """The dotted keys a group file sets, with the package it writes into."""
    text = path.read_text()
    cfg = OmegaConf.to_container(OmegaConf.load(path) or OmegaConf.create(), resolve=False)
    cfg = {k: v for k, v in cfg.items() if k not in ("defaults", "hydra")}
    return flat(cfg, "" if "# @package _global_" in text else f"{path.parent.name}.")


def test_no_group_file_repeats_a_schema_default():
    defaults = flat(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False))
    repeated = [f"{path.relative_to(config_dir())}: {key}={value!r}"
                for path in sorted(config_dir().glob("*/*.yaml")) if path.parent.name not in RECIPE_GROUPS
                for key, value in group_values(path).items()
                if key in defaults and defaults[key] == value and not key.endswith(".name")]
    assert repeated == []


def test_the_checker_sees_a_repeated_default(tmp_path):
    (tmp_path / "optim").mkdir()
    (tmp_path / "optim" / "x.yaml").write_text("lr: 1e-4\nweight_decay: 0.5\n")
    assert group_values(tmp_path / "optim" / "x.yaml") == {"optim.lr": 1e-4, "optim.weight_decay": 0.5}


def test_backbone_files_set_only_backbone_keys_and_model_sizes_have_their_group():
    for path in (config_dir() / "backbone").glob("*.yaml"):
        assert all(key.startswith("backbone.") for key in group_values(path)), path.name
    assert {"tiny", "detr"} <= {p.stem for p in (config_dir() / "model").glob("*.yaml")}
    assert compose_with_hydra(["backbone=resnet50", "model=tiny"]).model.hidden_dim == 64
    assert compose_with_hydra(["model=detr"]).model.hidden_dim == 256


@pytest.mark.parametrize("label", sorted(EXPECTED))
def test_recipes_compose_as_before_with_the_same_run_folder_names(label, monkeypatch):
    monkeypatch.delenv("COCO_ROOT", raising=False)
    overrides = [] if label == "default" else [f"experiment={label}"] if "=" not in label else \
        [f"experiment={part}" if "=" not in part else part for part in label.split(",")]
    cfg = compose_with_hydra(overrides)
    task = job_config(cfg)
    assert flat(OmegaConf.to_container(task, resolve=True)) == flat(EXPECTED[label]["config"])
    exclude = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert naming.variant_name(task, overrides, exclude) == EXPECTED[label]["variant"]
