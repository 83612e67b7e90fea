"""The Hydra config: every option composes and validates, and bad values stop a run before any
work (one line naming the key, the value and the choices). Sweeps, cluster profiles and the
installed package have their own test files."""
from __future__ import annotations

import pytest

from entry_points import GROUPS, TRAIN, compose_valid, one_error_line, options, run
from sparse_detr.config import ConfigError, config_dir, load_config, validate
from sparse_detr.sweep.compose import compose_with_hydra

pytestmark = pytest.mark.usefixtures("clean_cluster_env")


def test_every_group_has_its_options():
    assert set(GROUPS) <= {p.name for p in config_dir().iterdir() if p.is_dir()}
    assert options("cluster") == ["berzelius", "local", "local_slurm", "rpl"]
    assert {"smoke", "shapes_demo", "detr_r50_coco", "detr_r18_coco"} <= set(options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    base = [] if group == "experiment" else ["experiment=smoke"]
    config = compose_valid(*base, f"{group}={option}")
    if group in ("backbone", "attention", "placement", "data", "logger"):
        assert getattr(config, group).name == option
    if group == "cluster":
        assert config.cluster.name == option and config.cluster.preempt_signals == ["USR2"]


def test_the_default_config_is_the_local_cluster():
    cfg = compose_with_hydra([])
    assert cfg.cluster.name == "local"
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "basic"
    assert cfg.hydra.callbacks.validate_sweep._target_ == "sparse_detr.sweep.ValidateSweep"


@pytest.mark.parametrize("override,key,value,valid", [
    ("attention.alpha=2.5", "attention.alpha", "2.5", "(1.0, 2.0]"),
    ("attention.impl=fastest", "attention.impl", "'fastest'", "fast, eager, reference"),
    ("train.device=gpu", "train.device", "'gpu'", "auto, cpu, cuda"),
    ("train.amp=fp8", "train.amp", "'fp8'", "none, bf16, fp16"),
    ("placement.cross=sparsmax", "placement.cross", "'sparsmax'", "softmax, sparsemax, entmax15, alpha_entmax"),
    ("model.position_embedding=rope", "model.position_embedding", "'rope'", "sine, learned"),
    ("model.position_temperature=1", "model.position_temperature", "1", "(1.0, inf)"),
    ("cluster.preempt_signals=[USR9]", "cluster.preempt_signals", "'USR9'", "USR2"),
])
def test_a_bad_value_names_the_key_the_value_and_the_choices(override, key, value, valid):
    with pytest.raises(ConfigError) as error:
        validate(load_config(["experiment=smoke", override]))
    message = str(error.value)
    assert f"{key}={value}" in message and valid in message


def test_a_misspelt_group_option_lists_the_valid_ones():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        load_config(["cluster=berzelus"])
    message = str(error.value)
    assert "cluster/berzelus" in message
    for option in ("berzelius", "local", "local_slurm", "rpl"):
        assert option in message


# ------------------------------------------------------------------------------ console scripts


def test_a_learned_alpha_must_start_strictly_inside_its_range(compose):
    from sparse_detr.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"attention.alpha \(learned, initial\)=2.0 .*\(1.01, 2.0\)"):
        validate(compose("attention=alpha_entmax", "attention.alpha=2.0"))
    validate(compose("attention=alpha_entmax", "attention.alpha=2.0", "attention.learn_alpha=false"))


# ------------------------------------------------------------------------------ user errors: one line, exit 2


@pytest.mark.parametrize("overrides, message", [
    (["+model.hiden_dim=64"], "model.hiden_dim is not a config key; valid keys there: aux_loss, dec_layers"),
    (["optim.lr=nan"], "optim.lr=nan is not a number"),
    (["model.dropout=nan"], "model.dropout=nan is not a number"),
    (["attention=alpha_entmax", "attention.alpha=nan"], "attention.alpha=nan is not a number"),
    (["backbone=resnet18", "backbone.dilation=true"], "with backbone.dilation=true)='resnet18' is not valid; choose one of: resnet50, resnet101"),
    (["resume=/nowhere/checkpoint.pth"], "resume='/nowhere/checkpoint.pth': no such file"),
    (["init_from=/nowhere/detr.pth"], "init_from='/nowhere/detr.pth': no such file"),
])
def test_a_bad_run_stops_with_one_line_before_anything_is_built_or_written(tmp_path, overrides, message):
    result = run([*TRAIN, *overrides], tmp_path)
    assert message in one_error_line(result)
    assert not list(tmp_path.iterdir()), "nothing is written, not even the run folder"


def test_nan_fails_every_range_check():
    from sparse_detr.checks import check_range

    for bounds in ({}, {"low": 0.0}, {"high": 1.0}, {"low": 0.0, "high": 1.0, "low_open": True}):
        with pytest.raises(ConfigError, match="is not a number"):
            check_range("x", float("nan"), **bounds)


def test_a_missing_data_set_is_one_line_not_a_traceback(tmp_path):
    data = ["data=coco_format", f"data.train_images={tmp_path}/none", f"data.train_annotations={tmp_path}/none.json",
            f"data.val_images={tmp_path}/none", f"data.val_annotations={tmp_path}/none.json"]
    line = one_error_line(run([*TRAIN, *data, f"hydra.run.dir={tmp_path}/run"], tmp_path))
    assert line == f"error: annotation file not found: {tmp_path}/none.json"
    line = one_error_line(run([*TRAIN, "data=coco", f"data.root={tmp_path}/coco", f"hydra.run.dir={tmp_path}/run"],
                              tmp_path))
    assert line.startswith(f"error: COCO 2017 not found: missing {tmp_path}/coco/train2017") and "instances_val2017" in line


def test_a_missing_resume_file_is_no_error_once_the_run_has_its_own_checkpoint_or_is_only_evaluated(tmp_path):
    from sparse_detr.config import validate_run

    cfg = load_config(["experiment=smoke", f"resume={tmp_path}/moved.pth", f"init_from={tmp_path}/gone.pth"])
    with pytest.raises(ConfigError, match="resume=.*moved.pth'?: no such file"):
        validate_run(cfg, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"")  # a requeue: the run resumes from its own file
    validate_run(cfg, tmp_path / "run")
    validate(cfg)  # sparse-detr-eval checks a saved config on another machine: the files are not needed
