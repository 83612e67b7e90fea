"""TVMax: against a direct solve of the constrained problem, known answers, gradients, masking,
and where the config allows it."""
from __future__ import annotations

import itertools
import math
import logging

import entmax
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import torch

from sparse_detr.config import ConfigError, validate
from sparse_detr.models import tv_prox
from sparse_detr.models.mappings import attention_mapping
from sparse_detr.models import tvmax_cells

cp = pytest.importorskip("cvxpy")


def tvmax(tv_lambda, learn=False, heads=2):
    return attention_mapping("tvmax", tv_lambda=tv_lambda, learn_lambda=learn, num_heads=heads, impl="eager").double()


def direct_solve(z: torch.Tensor, height: int, width: int, lam: float, valid: torch.Tensor) -> torch.Tensor:
    """argmin over the simplex of the valid cells of 1/2 ||p - z||^2 + lam * sum |p_i - p_j| over
    4-neighbour pairs of valid cells, by cvxpy (an interior-point solver); padded cells get 0."""
    valid = valid.numpy()
    cells = [i for i in range(height * width) if valid[i]]
    p = cp.Variable(len(cells))
    where = {cell: k for k, cell in enumerate(cells)}
    pairs = [(where[i], where[j]) for i in cells for j in (i + 1, i + width)
             if j in where and (j == i + width or j % width)]
    objective = 0.5 * cp.sum_squares(p - z.numpy()[cells])
    if pairs:
        first, second = zip(*pairs)
        objective = objective + lam * cp.sum(cp.abs(p[list(first)] - p[list(second)]))
    cp.Problem(cp.Minimize(objective), [p >= 0, cp.sum(p) == 1]).solve(
        solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    out = torch.zeros(height * width, dtype=torch.float64)
    out[cells] = torch.as_tensor(p.value)
    return out


def padded_scores(height, width, scale, seed, ties=False):
    """[2, 2 heads, 2 queries, H * W] scores and a key mask: image 0 whole, image 1 on its top-left
    (H - 1) x (W - 2) cells (padding at the bottom and right, as batches are padded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 2, height * width, generator=g, dtype=torch.float64) * scale
    if ties:
        x = torch.round(x * 2 / scale) / 2 * scale
    mask = torch.ones(2, height, width, dtype=torch.bool)
    mask[0] = False
    mask[1, : height - 1, : width - 2] = False
    return x, mask.flatten(1)


@pytest.mark.parametrize("height,width", [(3, 4), (5, 7), (6, 6)])
@pytest.mark.parametrize("lam", [0.02, 0.3, 3.0])
def test_matches_direct_solve_of_the_constrained_problem(height, width, lam):
    for scale, ties in [(0.1, False), (1.0, True), (10.0, False)]:
        x, mask = padded_scores(height, width, scale, seed=height * width, ties=ties)
        p = tvmax(lam)(x, key_padding_mask=mask, key_grid=(height, width))
        for b, h, q in itertools.product(range(2), range(2), range(2)):
            expected = direct_solve(x[b, h, q], height, width, lam, ~mask[b])
            assert (p[b, h, q] - expected).abs().max() <= 1e-5, (scale, ties, b, h, q)


def test_lambda_zero_is_sparsemax_exactly():
    x, mask = padded_scores(5, 7, 1.0, seed=1, ties=True)
    expected = attention_mapping("sparsemax", impl="eager").double()(x, key_padding_mask=mask)
    assert torch.equal(tvmax(0.0)(x, key_padding_mask=mask, key_grid=(5, 7)), expected)


def test_huge_lambda_is_uniform_over_the_valid_cells():
    x, mask = padded_scores(4, 6, 1.0, seed=2)
    p = tvmax(1e4)(x, key_padding_mask=mask, key_grid=(4, 6))
    valid = (~mask).double()[:, None, None, :]
    torch.testing.assert_close(p, (valid / valid.sum(-1, keepdim=True)).expand_as(p), atol=1e-9, rtol=0)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_a_distribution_invariant_to_a_constant_shift(scale):
    x, mask = padded_scores(5, 7, scale, seed=3)
    m = tvmax(0.3)
    p = m(x, key_padding_mask=mask, key_grid=(5, 7))
    assert (p >= 0).all() and torch.equal(p[1].masked_select(mask[1][None, None]), torch.zeros(2 * 2 * mask[1].sum().item(), dtype=p.dtype))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(m(x + 3.7, key_padding_mask=mask, key_grid=(5, 7)), p, atol=1e-9, rtol=0)


def test_padded_batch_equals_each_image_alone():
    x, mask = padded_scores(5, 7, 1.0, seed=4)
    m = tvmax(0.3)
    p = m(x, key_padding_mask=mask, key_grid=(5, 7))
    alone = x[1].reshape(2, 2, 5, 7)[..., :4, :5].reshape(1, 2, 2, 20)
    expected = m(alone, key_grid=(4, 5)).reshape(2, 2, 4, 5)
    torch.testing.assert_close(p[1].reshape(2, 2, 5, 7)[..., :4, :5], expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(p[0:1], m(x[0:1], key_grid=(5, 7)), atol=1e-9, rtol=0)


def test_rows_done_early_leave_the_loop_with_the_answer_they_get_alone():
    """lambdas 0.01 and 3 need a few and hundreds of dual passes: each row equals its own solve."""
    torch.manual_seed(8)
    z = torch.randn(6, 5, 7, dtype=torch.float64) * 2
    lam = torch.tensor([0.01, 3.0, 0.01, 0.3, 3.0, 0.01], dtype=torch.float64).view(6, 1)
    edges = tv_prox.grid_edges(torch.ones(6, 5, 7, dtype=torch.bool))
    together = tv_prox.tv_prox(z.view(6, 35), lam, *edges, 7)[0]
    for row in range(6):
        alone = tv_prox.tv_prox(z[row].view(1, 35), lam[row:row + 1], *(edge[row:row + 1] for edge in edges), 7)[0]
        torch.testing.assert_close(together[row:row + 1], alone, atol=1e-12, rtol=0)


def _canonical(labels: torch.Tensor) -> torch.Tensor:
    """Each cell's label replaced by the smallest flat index in its group: equal partitions -> equal."""
    flat = labels.reshape(-1)
    index = torch.arange(flat.numel())
    first = torch.full((flat.numel(),), flat.numel()).scatter_reduce(0, flat, index, "amin")
    return first[flat].view_as(labels)


def _packed_components_by_scipy(connect_h: torch.Tensor, connect_v: torch.Tensor, nb) -> torch.Tensor:
    """Reference labels for the packed layout: scipy's connected components of all rows' cells as
    one graph."""
    rows, n = connect_h.shape
    cell = torch.arange(rows * n).view(rows, n)
    ends = [(cell[connect], (neighbour + cell[:, :1])[connect]) for connect, neighbour in ((connect_h, nb[0]), (connect_v, nb[1]))]
    tails, heads = (torch.cat(part).numpy() for part in zip(*ends))
    graph = scipy.sparse.coo_matrix((np.ones(len(tails), dtype=bool), (tails, heads)), shape=(rows * n, rows * n))
    return torch.from_numpy(scipy.sparse.csgraph.connected_components(graph, directed=False)[1]).long().view(rows, n)


@pytest.mark.parametrize("share", [0.2, 0.6, 0.9])
def test_components_equal_scipy_labelling(share):
    """Grid layout: scipy's image labelling (the CPU path) and the tensor propagation (the GPU
    path) give the same groups. Packed layout (propagation on every device): the groups of scipy's
    graph components. No group spans two rows."""
    torch.manual_seed(9)
    valid = torch.ones(5, 6, 9, dtype=torch.bool)
    grid_h, grid_v = (connect & (torch.rand(5, 54) < share) for connect in tv_prox.grid_edges(valid))
    in_play = torch.rand(5, 54) < 0.7
    nb = tvmax_cells._packed_layout(torch.zeros(5, 54), *in_play.nonzero(as_tuple=True), in_play.sum(1), 9, images=5).nb
    none = nb[0].shape[1] - 1
    packed_h, packed_v = ((slot != none) & (torch.rand(slot.shape) < share) for slot in nb[:2])
    cases = [(tv_prox.components(grid_h, grid_v, 9, compiled=False),
              tv_prox._components_by_propagation(grid_h, grid_v, 9, compiled=False)),
             (_packed_components_by_scipy(packed_h, packed_v, nb),
              tv_prox.components(packed_h, packed_v, nb, compiled=False))]
    for by_scipy, ours in cases:
        assert torch.equal(_canonical(by_scipy), _canonical(ours))
        rows, n = by_scipy.shape
        rows_of_label = torch.arange(rows).repeat_interleave(n)
        assert torch.equal(rows_of_label[_canonical(ours).reshape(-1)], rows_of_label)


@pytest.mark.parametrize("lam", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("scale", [0.3, 1.0, 5.0])
def test_cells_out_of_play_are_zero_and_packing_them_changes_nothing(monkeypatch, lam, scale):
    """The screening is exact: every cell it leaves out is 0 in the whole-grid solve, and the packed
    solve equals the whole-grid one, output and gradients (scores and a learned lambda)."""
    monkeypatch.setattr(tvmax_cells, "PACK_SHARE", math.inf)  # pack whatever the share
    x, mask = padded_scores(6, 8, scale, seed=int(lam * 100 + scale * 10))
    x = x.repeat(1, 1, 4, 1).requires_grad_()
    whole, packed = (attention_mapping("tvmax", tv_lambda=lam, learn_lambda=True, num_heads=2, impl=impl).double()
                     for impl in ("reference", "eager"))
    g = torch.randn_like(x)
    p_whole = whole(x, key_padding_mask=mask, key_grid=(6, 8))
    p_packed = packed(x, key_padding_mask=mask, key_grid=(6, 8))
    torch.testing.assert_close(p_packed, p_whole, atol=1e-9, rtol=0)
    for mine, theirs in zip(torch.autograd.grad(p_packed, (x, packed.log_lambda), g),
                            torch.autograd.grad(p_whole, (x, whole.log_lambda), g)):
        torch.testing.assert_close(mine, theirs, atol=1e-8, rtol=1e-8)
    masked = x.detach().masked_fill(mask[:, None, None, :], float("-inf")).reshape(-1, 48)
    threshold, in_row = tvmax_cells._screening_threshold(masked, torch.full((masked.shape[0], 1), lam, dtype=masked.dtype))
    in_play = masked > threshold
    assert torch.equal(in_row.long(), in_play.sum(1))
    support = p_whole.detach().reshape(-1, 48) > 0
    exact_tau = masked.amax(1, keepdim=True) - entmax.sparsemax(masked, dim=1).amax(1, keepdim=True)
    assert not ((masked > exact_tau - 8 * lam) & ~in_play).any()  # its threshold stays below the exact one
    assert not (support & ~in_play).any()
    if scale >= 1.0 and lam <= 0.1:  # scores spread wider than the band: most cells are left out
        assert in_play.sum() < 0.5 * (masked > float("-inf")).sum()


def test_neighbours_found_through_an_unfilled_table():
    """The entry table is left unfilled outside the cells in play: any numbers there, even real
    entry numbers, find the same neighbours (and kinds) as a table of -1. Each entry's count of
    valid neighbours out of play is the direct count (two rows to an image, sharing its padding)."""
    torch.manual_seed(4)
    images, height, width = 3, 5, 7
    n, rows = height * width, 2 * images
    valid = torch.rand(images, n) > 0.15
    row, cell = ((torch.rand(rows, n) < 0.4) & valid.repeat_interleave(2, 0)).nonzero(as_tuple=True)  # in play: valid
    key = row * n + cell
    entries = torch.arange(key.numel(), dtype=torch.int32)
    clean = torch.full((rows * n,), -1, dtype=torch.int32).index_put_((key,), entries)
    garbage = torch.randint(0, key.numel(), (rows * n,), dtype=torch.int32).index_put_((key,), entries)
    found = [tvmax_cells._entry_neighbours(key, table, valid.reshape(-1), row // 2 * n, n, width) for table in (clean, garbage)]
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(*found))
    neighbour, out_of_play, _ = found[0]
    assert (neighbour >= 0).any() and (neighbour == -1).any()
    assert torch.equal(key[neighbour[1][neighbour[1] >= 0]], key[neighbour[1] >= 0] + width)  # down is one row below
    in_play = set(key.tolist())
    for entry, (r, c) in enumerate(zip(row.tolist(), cell.tolist())):
        y, x = divmod(c, width)
        around = [(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))]
        expected = sum(1 for yy, xx in around if 0 <= yy < height and 0 <= xx < width
                       and valid[r // 2, yy * width + xx] and r * n + yy * width + xx not in in_play)
        assert int(out_of_play[entry]) == expected


def test_the_closed_form_for_a_pair_equals_the_iterative_prox():
    """Two cells joined by one edge: merged (|a - b| <= 2 lambda) and apart, both orders, with the
    gradients the prox's groups give (averaged when merged; lambda moves each apart cell)."""
    torch.manual_seed(3)
    z = (torch.randn(64, 1, 2, dtype=torch.float64) * 2).requires_grad_()
    lam = torch.full((64, 1, 1), 0.4, dtype=torch.float64, requires_grad=True)
    a, b = tvmax_cells._pair_prox(z[:, 0, 0], z[:, 0, 1], lam[:, 0, 0])
    mine = torch.stack((a, b), 1)
    merged = (z[:, 0, 0] - z[:, 0, 1]).abs() <= 0.8
    assert 0 < int(merged.sum()) < 64
    theirs = tv_prox.TVProxFunction.apply(z.view(64, 2), lam.view(64, 1), *tv_prox.grid_edges(torch.ones(64, 1, 2, dtype=torch.bool)),
                                          2, False)
    torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=0)
    g = torch.randn(64, 2, dtype=torch.float64)
    for mine_grad, their_grad in zip(torch.autograd.grad(mine, (z, lam), g), torch.autograd.grad(theirs, (z, lam), g)):
        torch.testing.assert_close(mine_grad, their_grad, atol=1e-12, rtol=0)


def test_gradcheck_scores_and_learned_lambda():
    """float64, random scores (no ties): the prox's groups and the sparsemax support stay put
    under gradcheck's perturbations, where the Jacobian is exact."""
    m = tvmax(0.2, learn=True)
    torch.manual_seed(5)
    x = (torch.randn(2, 2, 2, 12, dtype=torch.float64)).requires_grad_()
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True  # image 1: the top two rows of the 3 x 4 grid
    log_lambda = m.log_lambda.detach().clone().requires_grad_()

    def f(x, log_lambda):
        return torch.func.functional_call(m, {"log_lambda": log_lambda}, (x,), {"key_padding_mask": mask, "key_grid": (3, 4)})

    assert torch.autograd.gradcheck(f, (x, log_lambda), atol=1e-6)


def test_fixed_lambda_gradcheck_and_gradient_averaged_over_groups():
    m = tvmax(0.5)
    torch.manual_seed(6)
    x = torch.randn(1, 2, 3, 20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, key_grid=(4, 5)), (x,))


def test_half_precision_computes_in_float32():
    m = attention_mapping("tvmax", tv_lambda=0.3, impl="eager")
    scores = torch.randn(2, 2, 3, 30).to(torch.bfloat16)
    p = m(scores, key_grid=(5, 6))
    assert p.dtype == torch.bfloat16
    assert torch.equal(p, m(scores.float(), key_grid=(5, 6)).to(torch.bfloat16))


def test_single_cell_gets_probability_one():
    x = torch.randn(2, 2, 4, 1, dtype=torch.float64)
    assert torch.equal(tvmax(0.5)(x, key_grid=(1, 1)), torch.ones_like(x))


def test_without_a_grid_it_refuses():
    with pytest.raises(ValueError, match="key grid"):
        tvmax(0.1)(torch.randn(1, 2, 3, 12, dtype=torch.float64))


def test_iteration_cap_logs_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(tv_prox, "MAX_ITERATIONS", 10)
    x, _ = padded_scores(6, 6, 10.0, seed=7)
    with caplog.at_level(logging.WARNING, logger=tv_prox.__name__):
        tvmax(3.0)(x, key_grid=(6, 6))
    assert "cap of 10 iterations" in caplog.text


def test_placement_at_decoder_self_attention_is_a_config_error_naming_the_site(compose):
    with pytest.raises(ConfigError, match=r"placement.decoder='tvmax'.*decoder self-attention.*encoder, cross"):
        validate(compose("attention=tvmax", "placement=all"))
    validate(compose("attention=tvmax", "placement=cross"))
    with pytest.raises(ConfigError, match="attention.tv_lambda"):
        validate(compose("attention=tvmax", "placement=cross", "attention.tv_lambda=0"))


@pytest.mark.parametrize("placement", ["cross", "encoder"])
def test_smoke_model_trains_with_tvmax_and_its_loss_falls(compose, placement):
    """AdamW steps on one fixed batch of two images of different sizes (so keys are padded)."""
    from sparse_detr import build_model
    from sparse_detr.engine.optim import build_optimizer

    cfg = compose("attention=tvmax", f"placement={placement}", "attention.learn_lambda=true", "optim.lr=1e-3",
                  "attention.impl=eager")
    validate(cfg)
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 32, generator=g)]
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]], dtype=torch.float32)},
               {"labels": torch.tensor([2, 3]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.2], [0.7, 0.3, 0.2, 0.4]])}]
    losses = []
    for _ in range(12):
        parts = criterion(model(images), targets)
        loss = sum(parts[k] * w for k, w in criterion.weight_dict.items() if k in parts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    lambdas = [p for name, p in model.named_parameters() if name.endswith("log_lambda")]
    assert len(lambdas) == 2 and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lambdas)


def test_compiled_equals_eager_without_recompiling_for_new_grid_sizes(monkeypatch):
    """Both layouts (the packed cells in play and the whole grid): compiled once, for any size."""
    from sparse_detr.models import compiled_kernel

    if not compiled_kernel.compile_enabled():
        pytest.skip("compilation disabled (SPARSE_DETR_COMPILE=0 or unavailable)")
    fast = attention_mapping("tvmax", tv_lambda=0.3, impl="fast")
    eager = attention_mapping("tvmax", tv_lambda=0.3, impl="eager")
    frames = torch._dynamo.utils.counters["stats"]
    for i, (height, width, share) in enumerate([(5, 7, math.inf), (5, 7, 0.0), (4, 9, math.inf), (4, 9, 0.0),
                                                (6, 6, math.inf), (6, 6, 0.0)]):
        monkeypatch.setattr(tvmax_cells, "PACK_SHARE", share)  # inf: always packed, 0: always the whole grid
        x, mask = padded_scores(height, width, 2.0, seed=10 + i)
        x = x.float().requires_grad_()
        g = torch.randn_like(x)
        p_fast = fast(x, key_padding_mask=mask, key_grid=(height, width))
        (dx_fast,) = torch.autograd.grad(p_fast, x, g)
        p_eager = eager(x, key_padding_mask=mask, key_grid=(height, width))
        (dx_eager,) = torch.autograd.grad(p_eager, x, g)
        torch.testing.assert_close(p_fast, p_eager, atol=1e-5, rtol=0)
        torch.testing.assert_close(dx_fast, dx_eager, atol=1e-4, rtol=1e-4)
        if i == 1:
            compiled_after_first = frames["unique_graphs"]
    assert tv_prox._fista_block in compiled_kernel._COMPILED
    assert frames["unique_graphs"] == compiled_after_first, "a new grid size recompiled the kernel"
