"""Attention sparsity metrics and PAIBB against hand-made maps with known answers and loop references."""
import math

import pytest
import torch

from sparse_detr.metrics.names import GRID_METRICS
from sparse_detr.metrics.sparsity import METRICS, SparsityAccumulator, attention_sparsity, paibb, sparsity_sums

ROW_METRICS = tuple(name for name in METRICS if name not in GRID_METRICS)  # what a map without a key grid gets


def padded_rows(row_for_n, real_keys, keys, heads=2, queries=3, junk=0.0):
    """[batch, heads, queries, keys] with row_for_n(n) on each image's first n real keys, junk on padding."""
    weights = torch.full((len(real_keys), heads, queries, keys), junk)
    key_mask = torch.ones(len(real_keys), keys, dtype=torch.bool)
    for b, n in enumerate(real_keys):
        weights[b, :, :, :n] = row_for_n(n)
        key_mask[b, :n] = False
    return weights, key_mask


def mean_over_images(value_for_n, real_keys):
    """Every image has the same number of rows, so the row mean is the mean over images."""
    return sum(value_for_n(n) for n in real_keys) / len(real_keys)


REAL_KEYS = [5, 3, 8]


def test_uniform_rows():
    weights, key_mask = padded_rows(lambda n: torch.full((n,), 1 / n), REAL_KEYS, keys=8, junk=0.7)
    stats = attention_sparsity(weights, key_mask)
    assert set(stats) == set(ROW_METRICS)
    for name, expected in {
        "zero_ratio": 0.0,
        "near_zero_ratio": 0.0,
        "gini": 0.0,
        "support": mean_over_images(float, REAL_KEYS),
        "entropy": mean_over_images(math.log, REAL_KEYS),
    }.items():
        assert stats[name].shape == (2,)
        torch.testing.assert_close(stats[name], torch.full((2,), expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_one_hot_rows():
    weights, key_mask = padded_rows(lambda n: torch.eye(n)[n // 2], REAL_KEYS, keys=8, junk=0.3)
    stats = attention_sparsity(weights, key_mask)
    expected_ratio = mean_over_images(lambda n: n - 1, REAL_KEYS) / mean_over_images(float, REAL_KEYS)
    for name, expected in {
        "zero_ratio": expected_ratio,  # zeros over all real entries of all rows
        "gini": mean_over_images(lambda n: (n - 1) / n, REAL_KEYS),
        "support": 1.0,
        "entropy": 0.0,
    }.items():
        torch.testing.assert_close(stats[name], torch.full((2,), expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_two_equal_entries():
    weights, key_mask = padded_rows(lambda n: torch.tensor([0.5, 0.5] + [0.0] * (n - 2)), REAL_KEYS, keys=8)
    stats = attention_sparsity(weights, key_mask)
    for name, expected in {
        "gini": mean_over_images(lambda n: (n - 2) / n, REAL_KEYS),
        "support": 2.0,
        "entropy": math.log(2),
    }.items():
        torch.testing.assert_close(stats[name], torch.full((2,), expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_threshold_separates_exact_from_near_zeros():
    weights = torch.tensor([0.5 - 1e-9, 0.5 - 1e-9, 1e-9, 1e-9, 0.0]).double().expand(1, 1, 1, 5)
    stats = attention_sparsity(weights)
    assert stats["zero_ratio"].item() == pytest.approx(1 / 5)
    assert stats["near_zero_ratio"].item() == pytest.approx(3 / 5)
    assert attention_sparsity(weights, threshold=1e-12)["near_zero_ratio"].item() == pytest.approx(1 / 5)
    assert stats["support"].item() == 4


def test_per_head_values_differ():
    weights = torch.stack([torch.full((4,), 0.25), torch.eye(4)[0]])[None, :, None, :]  # head 0 uniform, head 1 one-hot
    stats = attention_sparsity(weights)
    torch.testing.assert_close(stats["gini"], torch.tensor([0.0, 0.75], dtype=torch.float64))
    torch.testing.assert_close(stats["support"], torch.tensor([4.0, 1.0], dtype=torch.float64))


def test_padded_queries_and_all_zero_rows_are_excluded():
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(2, 3, 6, 6, generator=generator).softmax(-1)
    reference = attention_sparsity(weights)
    query_mask = torch.zeros(2, 9, dtype=torch.bool)
    query_mask[:, 6:] = True
    with_extra_rows = torch.cat([weights, torch.full((2, 3, 3, 6), 0.2)], dim=2)  # junk on padded queries
    with_extra_rows[:, :, 6:7] = 0.0  # padded and all zero
    zero_rows = torch.cat([weights, torch.zeros(2, 3, 3, 6)], dim=2)
    for stats in (attention_sparsity(with_extra_rows, query_mask=query_mask), attention_sparsity(zero_rows)):
        for name in ROW_METRICS:
            torch.testing.assert_close(stats[name], reference[name])


def loop_reference(weights, key_mask, query_mask, threshold):
    """Row-by-row metrics in float64 numpy-style Python, Gini from mean absolute differences."""
    sums = {name: [0.0] * weights.shape[1] for name in ROW_METRICS}
    rows, entries = [0] * weights.shape[1], [0] * weights.shape[1]
    for b in range(weights.shape[0]):
        real = ~key_mask[b]
        for h in range(weights.shape[1]):
            for q in range(weights.shape[2]):
                x = weights[b, h, q][real].double()
                if query_mask[b, q] or x.sum() == 0:
                    continue
                n = len(x)
                rows[h] += 1
                entries[h] += n
                sums["zero_ratio"][h] += (x == 0).sum().item()
                sums["near_zero_ratio"][h] += (x <= threshold).sum().item()
                sums["gini"][h] += ((x[:, None] - x[None, :]).abs().sum() / (2 * n * x.sum())).item()
                sums["support"][h] += (x > 0).sum().item()
                sums["entropy"][h] += -sum(v * math.log(v) for v in x.tolist() if v > 0)
    counts = {"zero_ratio": entries, "near_zero_ratio": entries}
    return {
        name: torch.tensor([s / c for s, c in zip(sums[name], counts.get(name, rows))], dtype=torch.float64)
        for name in ROW_METRICS
    }


def random_sparse_batch(generator, batch=3, heads=2, keys=7):
    """Random rows with random exact zeros, random key padding, some padded queries and zero rows."""
    logits = torch.randn(batch, heads, keys, keys, generator=generator)
    weights = torch.where(torch.rand(logits.shape, generator=generator) < 0.5, 0.0, logits.exp())
    weights[..., 0] += 1e-7  # tiny but non-zero entries
    weights = weights / weights.sum(-1, keepdim=True)
    weights[0, 1, 2] = 0.0
    real_keys = torch.randint(2, keys + 1, (batch,), generator=generator)
    key_mask = torch.arange(keys)[None, :] >= real_keys[:, None]
    return weights, key_mask


def test_matches_loop_reference_on_random_sparse_maps():
    generator = torch.Generator().manual_seed(1)
    weights, key_mask = random_sparse_batch(generator)
    stats = attention_sparsity(weights, key_mask, query_mask=key_mask, threshold=1e-6)
    reference = loop_reference(weights, key_mask, key_mask, threshold=1e-6)
    for name in ROW_METRICS:
        torch.testing.assert_close(stats[name], reference[name], atol=1e-6, rtol=1e-6)


def test_accumulator_over_two_batches_equals_one_big_batch():
    generator = torch.Generator().manual_seed(2)
    first, first_mask = random_sparse_batch(generator, batch=2, keys=5)
    second, second_mask = random_sparse_batch(generator, batch=3, keys=7)
    accumulator = SparsityAccumulator()
    accumulator.update("encoder", 0, first, first_mask, query_mask=first_mask)
    accumulator.update("encoder", 0, second, second_mask, query_mask=second_mask)
    accumulator.update("decoder_cross", 1, second, second_mask)
    # One batch: pad the first batch's keys and queries from 5 to 7.
    padded = torch.nn.functional.pad(first, (0, 2, 0, 2), value=0.3)
    padded_mask = torch.nn.functional.pad(first_mask, (0, 2), value=True)
    big = torch.cat([padded, second])
    big_mask = torch.cat([padded_mask, second_mask])
    expected = attention_sparsity(big, big_mask, query_mask=big_mask)
    result = accumulator.compute()
    assert set(result) == {("encoder", 0), ("decoder_cross", 1)}
    for name in ROW_METRICS:
        torch.testing.assert_close(result[("encoder", 0)][name], expected[name])
        torch.testing.assert_close(result[("decoder_cross", 1)][name], attention_sparsity(second, second_mask)[name])
    assert set(sparsity_sums(first, first_mask)) == set(ROW_METRICS)


# PAIBB ---------------------------------------------------------------------------------------


def cross_attention(maps, queries=4, query=1):
    """[heads, h, w] maps -> ([1, heads, queries, h*w] weights with the maps on `query`, [1, h, w] mask)."""
    heads, h, w = maps.shape
    weights = torch.zeros(1, heads, queries, h * w)
    weights[0, :, query] = maps.reshape(heads, -1)
    return weights, torch.zeros(1, h, w, dtype=torch.bool)


def test_paibb_inside_outside_half_and_partial_cells():
    maps = torch.zeros(4, 2, 2)
    maps[0, 0, 0] = 1.0  # top-left cell
    maps[1, :, 0] = 0.5  # left column
    maps[2, 1, 1] = 1.0  # bottom-right cell
    maps[3] = 0.25  # uniform
    weights, mask = cross_attention(maps)
    left_half = torch.tensor([[0.25, 0.5, 0.5, 1.0]])  # cxcywh: x in [0, 0.5], y in [0, 1]
    result = paibb(weights, mask, [(torch.tensor([1]), left_half)])
    torch.testing.assert_close(result["per_head"], torch.tensor([[1.0, 1.0, 0.0, 0.5]]))
    torch.testing.assert_close(result["pair"], torch.tensor([0.625]))
    # x in [0, 0.25] covers half of each left cell: exact area weights, not cell centres.
    quarter = torch.tensor([[0.125, 0.5, 0.25, 1.0]])
    result = paibb(weights, mask, [(torch.tensor([1]), quarter)])
    torch.testing.assert_close(result["per_head"], torch.tensor([[0.5, 0.5, 0.0, 0.25]]))


def test_paibb_equals_box_upsampling_on_a_fine_grid():
    generator = torch.Generator().manual_seed(3)
    h, w, scale = 3, 5, 4
    maps = torch.rand(2, h, w, generator=generator)
    maps = maps / maps.sum((-2, -1), keepdim=True)
    weights, mask = cross_attention(maps, query=0)
    # Box edges on the fine grid, so summing whole fine pixels is exact.
    x0, x1, y0, y1 = 3 / (w * scale), 14 / (w * scale), 5 / (h * scale), 9 / (h * scale)
    box = torch.tensor([[(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]])
    fine = maps.repeat_interleave(scale, 1).repeat_interleave(scale, 2) / scale**2
    expected = fine[:, 5:9, 3:14].sum((-2, -1))
    result = paibb(weights, mask, [(torch.tensor([0]), box)])
    torch.testing.assert_close(result["per_head"][0], expected)


def test_paibb_alone_equals_in_a_padded_batch_with_a_larger_image():
    generator = torch.Generator().manual_seed(4)
    heads, queries = 2, 5
    small = torch.rand(heads, queries, 3, 4, generator=generator).softmax(-1)
    small_weights = small.reshape(1, heads, queries, 12)
    small_matches = (torch.tensor([3, 0]), torch.tensor([[0.4, 0.5, 0.5, 0.6], [0.7, 0.3, 0.2, 0.5]]))
    alone = paibb(small_weights, torch.zeros(1, 3, 4, dtype=torch.bool), [small_matches])

    big_weights = torch.rand(2, heads, queries, 5 * 6, generator=generator)
    big_weights[1] = 0.1  # junk on the padded cells: PAIBB is relative to the real cells' mass
    big_weights[1].view(heads, queries, 5, 6)[..., :3, :4] = small
    mask = torch.ones(2, 5, 6, dtype=torch.bool)
    mask[0] = False
    mask[1, :3, :4] = False
    other_matches = (torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.3, 0.3]]))
    no_matches = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))
    batched = paibb(
        torch.cat([big_weights, big_weights[:1]]), torch.cat([mask, mask[:1]]), [other_matches, small_matches, no_matches]
    )
    torch.testing.assert_close(batched["per_head"][1:], alone["per_head"])
    assert batched["per_head"].shape == (3, heads)
    assert batched["head_mean"].shape == (heads,) and batched["mean"].shape == ()


def _distributed_worker(rank, world_size, init_file, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    weights, key_mask = random_sparse_batch(torch.Generator().manual_seed(10 + rank))
    accumulator = SparsityAccumulator()
    accumulator.update("encoder", 0, weights, key_mask, query_mask=key_mask)
    accumulator.synchronize()
    if rank == 0:
        results.put({name: value.tolist() for name, value in accumulator.compute()[("encoder", 0)].items()})
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_accumulator_synchronize_sums_all_ranks(tmp_path):
    batches = [random_sparse_batch(torch.Generator().manual_seed(10 + rank)) for rank in range(2)]
    weights = torch.cat([w for w, _ in batches])
    key_mask = torch.cat([m for _, m in batches])
    expected = attention_sparsity(weights, key_mask, query_mask=key_mask)
    results = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.spawn(_distributed_worker, args=(2, tmp_path / "init", results), nprocs=2, join=True)
    result = results.get()  # plain lists: tensors in a queue need the sender alive
    for name in ROW_METRICS:
        torch.testing.assert_close(torch.tensor(result[name], dtype=torch.float64), expected[name])
