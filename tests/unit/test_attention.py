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
@pytest.mark.parametrize("need_weights", [True, False])  # (False, in training: the fused kernel)
def test_softmax_matches_torch_multihead_attention(masked, need_weights):
    ours, reference = pair()
    mask = padding_mask() if masked else None
    q, k, v = inputs()
    out, weights = ours(q, k, v, key_padding_mask=mask, need_weights=need_weights)
    ref_out, ref_weights = reference(q, k, v, key_padding_mask=mask, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=0)
    else:
        assert weights is None

    grad = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, [q, k, v, *ours.parameters()], grad)
    ref_grads = torch.autograd.grad(ref_out, [q, k, v, *reference.parameters()], grad)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_state_dict_names_match_torch():
    ours, reference = pair()
    assert list(ours.state_dict()) == list(reference.state_dict())


def test_returning_weights_does_not_change_the_output():
    """Bit for bit in evaluation (what analysis and evaluation compare); to rounding in training,
    where the output without weights comes from the fused kernel."""
    ours, _ = pair()
    q, k, v = inputs()
    for training in (False, True):
        ours.train(training)
        without, none = ours(q, k, v, key_padding_mask=padding_mask())
        with_weights, weights = ours(q, k, v, key_padding_mask=padding_mask(), need_weights=True)
        assert none is None and weights.shape == (B, H, L, S)
        if training:
            torch.testing.assert_close(without, with_weights, atol=1e-12, rtol=0)
        else:
            assert torch.equal(without, with_weights)


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


@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_give_finite_output_and_gradients(need_weights):
    ours, _ = pair()
    q, k, v = inputs()
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0] = True
    out, weights = ours(q, k, v, key_padding_mask=mask, need_weights=need_weights)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 0], ours.out_proj.bias.expand(L, E))  # attends to nothing
    if need_weights:
        assert torch.all(weights[0] == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_training_dropout_reaches_the_fused_kernel_and_follows_the_seed():
    torch.manual_seed(0)
    module = MultiheadAttention(E, H, dropout=0.5).double()
    q, k, v = inputs()
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(module(q, k, v, key_padding_mask=padding_mask())[0])
    module.eval()
    plain = module(q, k, v, key_padding_mask=padding_mask())[0]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not torch.allclose(runs[0], plain)
