"""The export-friendly mappings give the training mappings' numbers, masks included."""
import pytest
import torch

from sparse_detr.models.export_mappings import export_mapping, use_export_mappings
from sparse_detr.models.mappings import attention_mapping

MAPPINGS = [("sparsemax", {}), ("entmax15", {}), ("alpha_entmax", {"alpha": 1.3}), ("alpha_entmax", {"alpha": 1.05}),
            ("alpha_entmax", {"alpha": 1.7, "learn_alpha": True, "num_heads": 3})]


def scores_and_mask(scale: float, dtype=torch.float32):
    generator = torch.Generator().manual_seed(int(scale * 100))
    scores = torch.randn(2, 3, 5, 17, generator=generator, dtype=dtype) * scale
    scores[0, 0, 0, :4] = scores[0, 0, 0, 4]  # ties, including the maximum
    mask = torch.zeros(2, 17, dtype=torch.bool)
    mask[1, 11:] = True                       # a padded image
    return scores, mask


@pytest.mark.parametrize("name, kwargs", MAPPINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_export_mapping_equals_the_training_mapping(name, kwargs, scale):
    mapping = attention_mapping(name, impl="eager", **kwargs)
    if kwargs.get("learn_alpha"):
        with torch.no_grad():
            mapping.pre_alpha.copy_(torch.tensor([-2.0, 0.0, 3.0]))  # alphas ~1.12, 1.5, 1.95
    exported = export_mapping(mapping)
    assert type(exported) is not type(mapping)
    assert exported.state_dict().keys() == mapping.state_dict().keys()
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.float64, 1e-7)):
        scores, mask = scores_and_mask(scale, dtype)
        expected = mapping(scores, key_padding_mask=mask)
        got = exported(scores, key_padding_mask=mask)
        assert torch.allclose(got, expected, atol=tolerance, rtol=0), (got - expected).abs().max()
        assert (got[1, ..., 11:] == 0).all() and torch.allclose(got.sum(-1), torch.ones(()).to(dtype), atol=1e-6)
        assert torch.equal(got == 0, expected == 0) or scale == 0.01  # the same support


def test_a_fully_padded_row_gives_zeros():
    scores = torch.randn(1, 1, 2, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    for name, kwargs in MAPPINGS:
        got = export_mapping(attention_mapping(name, impl="eager", **kwargs))(scores, key_padding_mask=mask)
        assert torch.equal(got, torch.zeros_like(got)), name


def test_use_export_mappings_swaps_every_sparse_site(compose):
    from sparse_detr.models.detr import build_model

    model = build_model(compose("attention=alpha_entmax", "placement=all", "attention.learn_alpha=true"))[0]
    learned = dict(model.named_parameters())
    use_export_mappings(model)
    names = {type(m.mapping).__name__ for m in model.modules() if hasattr(m, "mapping")}
    assert names == {"BisectedAlphaEntmax"}
    assert dict(model.named_parameters()).keys() == learned.keys()  # the learned alphas stay where they were
