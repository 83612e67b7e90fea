"""Mapping kinds are a registry keyed by the config's names; a new kind needs no package edit."""
from __future__ import annotations

import pytest
import torch

from sparse_detr import build_model
from sparse_detr.config import GRID_MAPPINGS, MAPPING_NAMES, config_dir
from sparse_detr.engine.optim import build_optimizer
from sparse_detr.models.mappings import MAPPINGS, AttentionMapping, attention_mapping, config_value, register_mapping
from sparse_detr.sites import SITES
from sparse_detr.tracking import LEARNED_GROUPS


def test_registry_keys_are_the_config_mapping_names():
    yaml_names = {path.stem for path in (config_dir() / "attention").glob("*.yaml")}
    assert tuple(MAPPINGS) == MAPPING_NAMES
    assert set(MAPPINGS) == yaml_names
    assert {name for name, kind in MAPPINGS.items() if kind.needs_grid} == set(GRID_MAPPINGS)


class TemperatureSoftmax(AttentionMapping):
    """softmax(x / temperature): a toy kind with a parameter read from the attention config."""
    name = "toy_temperature_softmax"

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    @classmethod
    def from_config(cls, attention_cfg, num_heads):
        return cls(config_value(attention_cfg, "temperature", 2.0))

    def _map(self, x):
        return torch.softmax(x / self.temperature, dim=-1)


@pytest.fixture
def toy_kind():
    """The toy kind, registered for one test only."""
    yield register_mapping(TemperatureSoftmax)
    del MAPPINGS[TemperatureSoftmax.name]


def test_a_kind_registered_from_outside_builds_everywhere_and_trains(compose, toy_kind):
    cfg = compose("attention.impl=eager", "+attention.temperature=3.0")
    for site in SITES:  # set on the composed config: validation only knows the packaged names
        cfg.placement[site] = toy_kind.name
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    attention = list(model.transformer.site_attention())
    assert {site for site, _, _ in attention} == set(SITES)
    assert all(type(module.mapping) is TemperatureSoftmax and module.mapping.temperature == 3.0
               for _, _, module in attention)
    assert type(attention_mapping(toy_kind.name)) is TemperatureSoftmax

    optimizer = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 64, generator=g)]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
               {"labels": torch.tensor([2, 3]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.2], [0.7, 0.3, 0.2, 0.4]])}]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = criterion(model(images), targets)
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    loss.backward()
    assert torch.isfinite(loss)
    # gradients reach every attention module through the toy mapping; the first decoder
    # self-attention attends over zero targets at initialisation, so its weights cannot matter
    for site, layer, module in attention:
        grad = module.in_proj_weight.grad
        assert grad is not None and torch.isfinite(grad).all(), (site, layer)
        assert (site, layer) == ("decoder", 0) or bool(grad.abs().sum() > 0), (site, layer)
    optimizer.step()
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert any("self_attn" in name for name in moved) and any("multihead_attn" in name for name in moved)


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="sparsemax.*twice"):
        register_mapping(type("Again", (AttentionMapping,), {"name": "sparsemax"}))


def test_every_learned_name_a_kind_declares_is_a_tracked_group():
    for kind in MAPPINGS.values():
        assert set(kind.learned_names) <= set(LEARNED_GROUPS), kind.name
