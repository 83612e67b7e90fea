"""Structured sparsity (4-connected regions of the support, mass share of the largest) on hand-made
maps with known answers, and through the sparsity machinery with padding."""
import pytest
import torch

from sparse_detr.metrics.names import GRID_METRICS
from sparse_detr.metrics.regions import support_regions
from sparse_detr.metrics.sparsity import SparsityAccumulator, attention_sparsity, site_layout, sparsity_sums

ONE_REGION = [[0, 1, 1, 0],
              [0, 1, 0, 0],
              [0, 2, 2, 2]]        # an L and a bar that touch at (1, 1)-(2, 1): one region
TWO_DIAGONAL = [[1, 0, 0, 0],
                [0, 3, 0, 0],
                [0, 0, 0, 0]]      # diagonal neighbours: two regions, 3 of 4 in the larger
THREE_REGIONS = [[2, 2, 0, 1],
                 [0, 0, 0, 0],
                 [5, 0, 0, 0]]     # masses 4, 1, 5 of 10


def as_maps(*maps):
    return torch.tensor(maps, dtype=torch.float64)


def test_known_regions_and_largest_share():
    regions, largest = support_regions(as_maps(ONE_REGION, TWO_DIAGONAL, THREE_REGIONS))
    assert regions.tolist() == [1, 2, 3]
    torch.testing.assert_close(largest, torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64))


def test_full_support_is_one_region_and_empty_map_has_none():
    regions, largest = support_regions(torch.stack([torch.rand(5, 7) + 0.1, torch.zeros(5, 7)]))
    assert regions.tolist() == [1, 0]
    assert largest[0].item() == pytest.approx(1.0) and torch.isnan(largest[1])


def test_maps_of_a_stack_are_not_connected_to_each_other():
    """The same cells lit in consecutive maps are separate regions of separate maps."""
    regions, _ = support_regions(torch.ones(4, 1, 1))
    assert regions.tolist() == [1, 1, 1, 1]


def rows_from_maps(maps, height, width, pad_to):
    """[heads, h, w] maps -> [1, heads, 1, H * W] weights on an (H, W) = pad_to map padded bottom and right
    (junk on the padding), and the [1, H, W] feature mask."""
    heads = len(maps)
    grid = torch.full((heads, *pad_to), 0.4, dtype=torch.float64)
    grid[:, :height, :width] = maps / maps.sum((-2, -1), keepdim=True)
    mask = torch.ones(1, *pad_to, dtype=torch.bool)
    mask[:, :height, :width] = False
    return grid.reshape(1, heads, 1, -1), mask


def test_grid_metrics_per_head_with_padding_as_each_image_alone():
    first = as_maps(THREE_REGIONS, TWO_DIAGONAL)                 # 3 x 4
    second = as_maps([[1, 0, 1], [0, 0, 0]], [[1, 1, 0], [0, 1, 1]])  # 2 x 3: regions 2, 1
    padded = [rows_from_maps(maps, *maps.shape[-2:], pad_to=(4, 5)) for maps in (first, second)]
    weights, mask = torch.cat([w for w, _ in padded]), torch.cat([m for _, m in padded])
    key_mask, query_mask, grid = site_layout("cross", mask)
    assert query_mask is None and grid == (4, 5)
    batched = attention_sparsity(weights, key_mask, query_mask, key_grid=grid)
    alone = [attention_sparsity(maps.flatten(1)[None, :, None] / maps.sum((-2, -1))[None, :, None, None],
                                key_grid=tuple(maps.shape[-2:])) for maps in (first, second)]
    for name in GRID_METRICS:
        torch.testing.assert_close(batched[name], (alone[0][name] + alone[1][name]) / 2)
    torch.testing.assert_close(batched["regions"], torch.tensor([2.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(batched["largest_region_share"], torch.tensor([0.5, 0.875], dtype=torch.float64))


def test_encoder_layout_skips_padded_queries_and_non_grid_sites_get_no_value():
    weights, mask = rows_from_maps(as_maps(ONE_REGION, THREE_REGIONS), 3, 4, pad_to=(3, 4))
    queries = weights.expand(1, 2, 12, 12).clone()
    mask[:, 2, :] = True                                  # the last row of cells is padding
    queries[:, :, 8:] = 0.9                               # junk on padded queries
    key_mask, query_mask, grid = site_layout("encoder", mask)
    stats = attention_sparsity(queries, key_mask, query_mask, key_grid=grid)
    torch.testing.assert_close(stats["regions"], torch.tensor([1.0, 2.0], dtype=torch.float64))  # padding cut 5 off
    torch.testing.assert_close(stats["largest_region_share"], torch.tensor([1.0, 0.8], dtype=torch.float64))
    key_mask, query_mask, grid = site_layout("decoder", mask)
    assert grid is None
    assert not set(GRID_METRICS) & set(sparsity_sums(queries, key_mask, query_mask, key_grid=grid))


def test_accumulator_adds_grid_metrics_over_batches():
    weights, mask = rows_from_maps(as_maps(THREE_REGIONS, ONE_REGION), 3, 4, pad_to=(3, 4))
    other, _ = rows_from_maps(as_maps(TWO_DIAGONAL, TWO_DIAGONAL), 3, 4, pad_to=(3, 4))
    accumulator = SparsityAccumulator()
    for batch in (weights, other, other):
        accumulator.update("cross", 0, batch, *site_layout("cross", mask))
    result = accumulator.compute()[("cross", 0)]
    torch.testing.assert_close(result["regions"], torch.tensor([7 / 3, 5 / 3], dtype=torch.float64))
