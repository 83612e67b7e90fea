"""Run folders, W&B groups and W&B run names are named after the model that runs: equal models get
equal names, and paths, secrets and keys that only name or place a run never enter a name."""
from __future__ import annotations

import pytest
from hydra.core.hydra_config import HydraConfig

from sparse_detr import naming
from sparse_detr.config import config_dir
from sparse_detr.sweep.compose import compose_with_hydra, job_config

COCO_FORMAT = ["data=coco_format", "data.train_images=/data/pets/train", "data.train_annotations=/data/pets/train.json",
               "data.val_images=/data/pets/val", "data.val_annotations=/data/pets/val.json"]


def run_folder(*overrides: str) -> str:
    """The run folder `sparse-detr-train experiment=smoke <overrides>` writes into, below outputs/runs/smoke."""
    cfg = compose_with_hydra(["experiment=smoke", *overrides])
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        return str(cfg.hydra.run.dir).removeprefix("outputs/runs/smoke/").removesuffix("/seed_42")
    finally:
        HydraConfig.instance().cfg = previous


@pytest.mark.parametrize("overrides", [
    [],
    ["attention=sparsemax", "placement=none"],
    ["attention=alpha_entmax", "placement=none", "attention.alpha=1.3"],
    ["attention=softmax", "attention.learn_alpha=true"],
    ["attention=softmax", "placement=all"],
    ["attention=softmax", "placement=cross", "attention.impl=eager"],
])
def test_every_all_softmax_model_is_the_softmax_baseline(overrides):
    assert run_folder(*overrides) == "softmax-none-tiny-shapes"


@pytest.mark.parametrize("overrides, name", [
    (["attention=sparsemax", "placement=cross"], "sparsemax-cross-tiny-shapes"),
    (["placement.cross=sparsemax"], "sparsemax-cross-tiny-shapes"),
    (["attention=sparsemax", "placement=cross", "attention.alpha=1.3"], "sparsemax-cross-tiny-shapes"),
    (["attention=entmax15", "placement=decoder_all", "model.dropout=0.2"], "entmax15-decoder_all-tiny-shapes+model.dropout=0.2"),
    (["attention=alpha_entmax", "placement=all", "attention.alpha=1.3"], "alpha_entmax-all-tiny-shapes+attention.alpha=1.3"),
    (["attention=sparsemax", "placement=encoder", "attention.impl=eager"], "sparsemax-encoder-tiny-shapes+attention.impl=eager"),
    (["placement.encoder=sparsemax", "placement.cross=sparsemax"], "sparsemax-encoder_cross-tiny-shapes"),
    (["placement.encoder=sparsemax", "placement.cross=entmax15"], "encoder_sparsemax-cross_entmax15-tiny-shapes"),
])
def test_a_sparse_model_is_named_after_its_mapping_and_sites_as_before(overrides, name):
    assert run_folder(*overrides) == name


def test_the_placement_names_are_those_of_conf_placement():
    for option in sorted(p.stem for p in (config_dir() / "placement").glob("*.yaml")):
        expected = "softmax-none" if option == "none" else f"entmax15-{option}"
        assert run_folder("attention=entmax15", f"placement={option}") == f"{expected}-tiny-shapes"


def test_logger_and_cluster_keys_do_not_change_the_run_folder():
    """Renaming the W&B run (or its group, tags, folder) resumes the same run instead of starting one."""
    base = run_folder("attention=sparsemax", "placement=cross")
    assert run_folder("attention=sparsemax", "placement=cross", "logger=wandb", "logger.group=mine",
                      "logger.run_name=renamed", "logger.tags=[a,b]", "logger.dir=/tmp/w",
                      "cluster.preempt_signals=[USR2,TERM]", "train.checkpoint_every=5") == base


def test_paths_never_enter_a_name_but_the_data_set_stays_told_apart():
    name = run_folder(*COCO_FORMAT)
    assert name.startswith("softmax-none-tiny-coco_format_") and "/" not in name and "pets" not in name
    assert run_folder(*COCO_FORMAT) == name, "the hash is stable"
    other = run_folder(*COCO_FORMAT[:-1], "data.val_annotations=/data/birds/val.json")
    assert other != name and other.startswith("softmax-none-tiny-coco_format_")
    assert run_folder("data.root=/scratch/shapes", "backbone.weights=/w/r50.pth") == "softmax-none-tiny-shapes"


def test_keys_that_look_like_secrets_never_enter_a_name():
    assert run_folder("+logger.api_key=SECRET", "+data.wandb_token=T") == "softmax-none-tiny-shapes"
    assert not naming.names_the_model("logger.api_key", {"softmax"})
    assert not naming.names_the_model("+data.token", {"softmax"})
    assert naming.override_suffix({}, ["+logger.api_key=SECRET", "+model.password=x", "model.dropout=0.2"]) \
        == "+model.dropout=0.2"


def test_the_wandb_group_and_run_name_are_the_run_folders_names():
    from sparse_detr.train import name_tracking_run

    overrides = ["experiment=smoke", "attention=sparsemax", "placement=none", "logger=wandb", "model.dropout=0.2"]
    cfg = compose_with_hydra(overrides)
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        job = job_config(cfg)
        name_tracking_run(job)
        assert job.logger.group == "softmax-none-tiny-shapes+model.dropout=0.2"
        assert job.logger.run_name == "softmax-none-tiny-shapes+model.dropout=0.2/seed_42"
        assert job.logger.tags == ["smoke", "softmax", "placement=none", "tiny", "shapes"]
    finally:
        HydraConfig.instance().cfg = previous


def test_the_report_labels_a_variant_as_its_run_folder_does():
    from sparse_detr.analysis.sweep_table import variant_of

    def config(name, placement, **sites):
        return {"attention": {"name": name}, "backbone": {"name": "tiny"}, "data": {"name": "shapes"},
                "placement": {"name": placement, **{s: sites.get(s, "softmax") for s in ("encoder", "decoder", "cross")}}}

    assert variant_of(config("sparsemax", "none"))["attention"] == "softmax"
    mixed = variant_of(config("softmax", "none", encoder="sparsemax", cross="entmax15"))
    assert (mixed["attention"], mixed["placement"]) == ("mixed", "encoder_sparsemax-cross_entmax15")
    assert variant_of(config("entmax15", "cross", cross="entmax15"))["placement"] == "cross"
