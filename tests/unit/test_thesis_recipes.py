"""`experiment=thesis_cross` and `experiment=thesis_baseline` are the thesis's recipes value for value.

THESIS is written from the thesis's own repository (erikdao/sparse-detector): configs/base.yml and
configs/decoder_*.yml (model, loss, batch, epochs, seed), slurm/*.sbatch (`--gpus 6`,
`torchrun --nproc_per_node=6`, 72 h), sparse_detector/models/attention.py (AlphaChooser:
pre_alpha = randn(heads), alpha = clamp(1 + sigmoid(pre_alpha), 1.01, 2)) and
sparse_detector/utils/lr_sheduler.py (alpha group at 10x lr, no decay, kept through the drop)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sparse_detr.config import load_config, validate
from sparse_detr.engine.optim import build_optimizer, build_scheduler
from sparse_detr.models.detr import build_model
from sparse_detr.models.mappings import attention_mapping
from sparse_detr.sweep.slurm import sbatch_script

THESIS = {
    "backbone.name": "resnet50", "backbone.dilation": False, "optim.lr_backbone": 1e-5,
    "model.position_embedding": "sine", "model.position_temperature": 10000.0,
    "model.enc_layers": 6, "model.dec_layers": 6, "model.hidden_dim": 256, "model.nheads": 8,
    "model.dim_feedforward": 2048, "model.dropout": 0.1, "model.num_queries": 100, "model.pre_norm": True,
    "model.aux_loss": True,
    "loss.set_cost_class": 1.0, "loss.set_cost_bbox": 5.0, "loss.set_cost_giou": 2.0,
    "loss.ce_loss_coef": 1.0, "loss.bbox_loss_coef": 5.0, "loss.giou_loss_coef": 2.0, "loss.eos_coef": 0.1,
    "data.name": "coco", "data.batch_size": 6, "cluster.gpus_per_node": 6,
    "optim.lr": 1e-4, "optim.weight_decay": 1e-4, "optim.clip_max_norm": 0.1,
    "optim.alpha_lr_multiplier": 10.0, "optim.alpha_lr_drop": False,
    "schedule.epochs": 300, "schedule.lr_drop": 200, "schedule.lr_drop_factor": 0.1, "seed": 42,
    "placement.encoder": "softmax", "placement.decoder": "softmax",
}
LEARNED_ALPHA = {"attention.learn_alpha": True, "attention.alpha_init": "random",
                 "attention.alpha_param": "clamped_sigmoid"}
RECIPES = {  # recipe overrides -> the mapping of the cross-attention
    ("experiment=thesis_cross",): "alpha_entmax",
    ("experiment=thesis_cross", "attention=sparsemax"): "sparsemax",
    ("experiment=thesis_cross", "attention=entmax15"): "entmax15",
    ("experiment=thesis_baseline",): "softmax",
}


def thesis_config(*overrides: str):
    return validate(load_config([*overrides, "data.root=/data/coco"]))


@pytest.mark.parametrize("overrides", list(RECIPES), ids="+".join)
def test_every_thesis_value_is_in_the_recipe(overrides):
    cfg = OmegaConf.structured(thesis_config(*overrides))
    expected = {**THESIS, "placement.cross": RECIPES[overrides]}
    if RECIPES[overrides] == "alpha_entmax":
        expected.update(LEARNED_ALPHA)
    actual = {key: OmegaConf.select(cfg, key) for key in expected}
    assert actual == expected


def test_the_thesis_recipe_asks_berzelius_for_6_gpus_for_72_hours(monkeypatch):
    monkeypatch.setenv("SPARSE_DETR_ACCOUNT", "berzelius-2025-123")
    for recipe in ("experiment=thesis_cross", "experiment=thesis_baseline"):
        lines = sbatch_script(["cluster=berzelius", recipe, "data.root=/data/coco"]).splitlines()
        for expected in ("--gpus=6", "--ntasks-per-node=6", "--nodes=1", "--time=4320"):
            assert f"#SBATCH {expected}" in lines, (recipe, expected)
    assert "#SBATCH --gpus=8" in sbatch_script(["cluster=berzelius"]).splitlines()


def test_thesis_alpha_is_the_clamped_sigmoid_of_a_standard_normal_draw():
    torch.manual_seed(7)
    mapping = attention_mapping("alpha_entmax", num_heads=8, learn_alpha=True, alpha_init="random",
                                alpha_param="clamped_sigmoid", impl="eager")
    torch.manual_seed(7)
    drawn = torch.randn(8)
    assert torch.equal(mapping.pre_alpha.detach(), drawn)
    torch.testing.assert_close(mapping.alpha.detach(), torch.clamp(1 + torch.sigmoid(drawn), 1.01, 2.0))
    with torch.no_grad():
        mapping.pre_alpha.copy_(torch.tensor([-10.0, -4.0, 0.0, 0.5, 2.0, 10.0, 30.0, -30.0]))
    expected = torch.tensor([1.01, 1 + torch.sigmoid(torch.tensor(-4.0)).item(), 1.5,
                             1 + torch.sigmoid(torch.tensor(0.5)).item(), 1 + torch.sigmoid(torch.tensor(2.0)).item(),
                             1 + torch.sigmoid(torch.tensor(10.0)).item(), 2.0, 1.01])
    torch.testing.assert_close(mapping.alpha.detach(), expected)
    mapping.alpha.sum().backward()
    assert mapping.pre_alpha.grad[0] == 0 and mapping.pre_alpha.grad[2] > 0   # the clamp stops the gradient


def test_the_default_learned_alpha_is_unchanged():
    mapping = attention_mapping("alpha_entmax", num_heads=4, learn_alpha=True, alpha=1.3, impl="eager")
    torch.testing.assert_close(mapping.alpha.detach(), torch.full((4,), 1.3))
    with torch.no_grad():
        mapping.pre_alpha.copy_(torch.tensor([-30.0, 0.0, 1.0, 30.0]))
    torch.testing.assert_close(mapping.alpha.detach(), 1.01 + 0.99 * torch.sigmoid(mapping.pre_alpha.detach()))
    a = attention_mapping("alpha_entmax", num_heads=4, learn_alpha=True, alpha=1.3, alpha_param="clamped_sigmoid")
    torch.testing.assert_close(a.alpha.detach(), torch.full((4,), 1.3))   # value starts work in both


@pytest.fixture(scope="module")
def thesis_model():
    cfg = load_config(["experiment=thesis_cross", "data.root=/data/coco", "model.num_classes=91",
                       "attention.impl=eager"])
    torch.manual_seed(cfg.seed)
    model, _, _ = build_model(cfg)
    return cfg, model


def test_the_thesis_model_draws_one_seeded_alpha_per_cross_attention_head_and_layer(thesis_model):
    cfg, model = thesis_model
    pre_alphas = {name: p for name, p in model.named_parameters() if name.endswith("pre_alpha")}
    assert len(pre_alphas) == 6 and all(".multihead_attn." in name for name in pre_alphas)
    values = torch.stack(list(pre_alphas.values())).detach()
    assert values.shape == (6, 8) and values.unique().numel() == 48
    assert -4 < values.mean() < 4 and 0.5 < values.std() < 1.6     # a standard normal draw, not a constant
    torch.manual_seed(cfg.seed)
    again, _, _ = build_model(cfg)
    assert torch.equal(torch.stack([p for n, p in again.named_parameters() if n.endswith("pre_alpha")]).detach(),
                       values)


def test_the_thesis_alpha_trains_at_10x_lr_without_decay_through_the_lr_drop(thesis_model):
    cfg, model = thesis_model
    optimizer = build_optimizer(model, cfg.optim)
    groups = {g["name"]: g for g in optimizer.param_groups}
    alpha_params = {id(p) for n, p in model.named_parameters() if n.endswith("pre_alpha")}
    assert {id(p) for p in groups["alpha"]["params"]} == alpha_params
    assert groups["alpha"]["weight_decay"] == 0.0 and groups["main"]["weight_decay"] == 1e-4
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.schedule)
    for epoch in range(201):
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        drop = 0.1 if epoch >= 200 else 1.0
        assert lrs == pytest.approx({"main": 1e-4 * drop, "backbone": 1e-5 * drop, "alpha": 1e-3}), epoch
        optimizer.step()
        scheduler.step()


def test_official_post_norm_detr_weights_start_a_thesis_run(tmp_path):
    from sparse_detr.engine.trainer import init_from_weights

    torch.manual_seed(0)
    official, _, _ = build_model(load_config(["backbone=resnet50", "data=coco", "data.root=/data/coco",
                                              "model.num_classes=91"]))
    torch.save({"model": official.state_dict()}, tmp_path / "detr-r50.pth")
    torch.manual_seed(42)
    thesis, _, _ = build_model(load_config(["experiment=thesis_cross", "data.root=/data/coco", "model.num_classes=91",
                                            "attention.impl=eager"]))
    pre_alpha = {n: p.detach().clone() for n, p in thesis.named_parameters() if n.endswith("pre_alpha")}
    init_from_weights(thesis, str(tmp_path / "detr-r50.pth"))
    state = thesis.state_dict()
    for key, value in official.state_dict().items():
        assert torch.equal(state[key], value), key
    assert torch.equal(state["transformer.encoder.norm.weight"], torch.ones(256))
    assert torch.equal(state["transformer.encoder.norm.bias"], torch.zeros(256))
    assert all(torch.equal(state[n], v) for n, v in pre_alpha.items())
