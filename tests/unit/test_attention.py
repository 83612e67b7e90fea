"""The softmax attention module is torch.nn.MultiheadAttention, output for output, gradient for gradient."""
import pytest
import torch

from sparse_detr import attention_mapping
from sparse_detr.models.attention import MultiheadAttention

E, H, L, S, B = 32, 4, 7, 11, 3


def pair(seed=0):
    torch.manual_seed(seed)
    reference = torch.nn.MultiheadAttention(E, H).double()
    ours = MultiheadAttention(E, H).double()
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, B, E, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(S, B, E, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(S, B, E, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def padding_mask():
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, -3:] = True
    mask[2, 4:] = True
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_softmax_matches_torch_multihead_attention(masked):
    ours, reference = pair()
    mask = padding_mask() if masked else None
    q, k, v = inputs()
    out, weights = ours(q, k, v, key_padding_mask=mask, need_weights=True)
    ref_out, ref_weights = reference(q, k, v, key_padding_mask=mask, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=0)

    grad = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, [q, k, v, *ours.parameters()], grad)
    ref_grads = torch.autograd.grad(ref_out, [q, k, v, *reference.parameters()], grad)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_state_dict_names_match_torch():
    ours, reference = pair()
    assert list(ours.state_dict()) == list(reference.state_dict())


def test_returning_weights_does_not_change_the_output():
    ours, _ = pair()
    q, k, v = inputs()
    without, none = ours(q, k, v, key_padding_mask=padding_mask())
    with_weights, weights = ours(q, k, v, key_padding_mask=padding_mask(), need_weights=True)
    assert none is None
    assert torch.equal(without, with_weights)
    assert weights.shape == (B, H, L, S)


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "alpha_entmax"])
def test_sparse_mapping_masks_padded_keys_and_sums_to_one(name):
    params = {"num_heads": H, "learn_alpha": True} if name == "alpha_entmax" else {}
    params["impl"] = "eager"
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, mapping=attention_mapping(name, **params)).double()
    q, k, v = inputs()
    mask = padding_mask()
    out, weights = module(q, k, v, key_padding_mask=mask, need_weights=True)
    assert torch.all(weights.masked_select(mask[:, None, None, :].expand_as(weights)) == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, L, dtype=torch.float64))
    assert (weights == 0).any(), "a sparse mapping should give exact zeros on random scores"
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_fully_masked_rows_give_finite_output_and_gradients():
    ours, _ = pair()
    q, k, v = inputs()
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0] = True
    out, weights = ours(q, k, v, key_padding_mask=mask, need_weights=True)
    assert torch.isfinite(out).all()
    assert torch.all(weights[0] == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
