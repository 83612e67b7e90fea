"""PAIBB by COCO object size, per decoder layer and head, on hand-made attention with known answers."""
from __future__ import annotations

import pytest
import torch

from sparse_detr.analysis.run_folders import logged_paibb
from sparse_detr.metrics.paibb_sizes import PaibbBySize, paibb_metrics, size_classes

ORIG = torch.tensor([100, 200])   # (h, w) in pixels


def box(x0, y0, x1, y1):
    """cxcywh normalised to a 200 x 100 image, from pixel corners."""
    return [(x0 + x1) / 400, (y0 + y1) / 200, (x1 - x0) / 200, (y1 - y0) / 100]


def test_sizes_are_cocos_by_area_in_original_pixels():
    boxes = torch.tensor([box(0, 0, 20, 20), box(0, 0, 31, 33), box(0, 0, 32, 32), box(0, 0, 50, 50),
                          box(0, 0, 96, 96), box(0, 0, 200, 100)])
    assert size_classes(boxes, ORIG).tolist() == [0, 0, 1, 1, 2, 2]   # 400, 1023, 1024, 2500, 9216, 20000


def test_paibb_is_kept_per_size_layer_and_head_and_averaged_over_heads():
    """A 2 x 4 feature map over a 200 x 100 image: each cell is 50 x 50 pixels. Query 0 matches a small
    box in cell (0, 0), query 1 a large box over the right half. Head 0 attends to cell (0, 0), head 1
    to cell (1, 3)."""
    weights = torch.zeros(1, 2, 3, 8)
    weights[0, 0, :, 0] = 1.0        # head 0: top-left cell
    weights[0, 1, :, 7] = 1.0        # head 1: bottom-right cell
    matches = [(torch.tensor([0, 1]), torch.tensor([box(0, 0, 25, 25), box(100, 0, 200, 100)]))]
    accumulator = PaibbBySize()
    accumulator.update(5, weights, torch.zeros(1, 2, 4, dtype=torch.bool), matches, ORIG[None])
    values = accumulator.compute()
    # small box covers a quarter of cell (0, 0): head 0 scores 0.25, head 1 nothing
    torch.testing.assert_close(values["small", 5], torch.tensor([0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(values["large", 5], torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(values["all", 5], torch.tensor([0.125, 0.5], dtype=torch.float64))
    assert ("medium", 5) not in values
    metrics = paibb_metrics(values)
    assert metrics["paibb/small/layer_5/head_0"] == 0.25 and metrics["paibb/large/layer_5/head_1"] == 1.0
    assert metrics["paibb/all/layer_5/mean"] == pytest.approx(0.3125)   # the head-averaged attention's PAIBB


def test_batches_add_up_and_pairs_without_attention_are_skipped():
    weights = torch.zeros(1, 2, 2, 8)
    weights[0, :, 0, 0] = 1.0        # query 0: both heads on the top-left cell
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    small = torch.tensor([box(0, 0, 25, 25)])
    accumulator = PaibbBySize()
    accumulator.update(0, weights, mask, [(torch.tensor([0]), small)], ORIG[None])
    accumulator.update(0, weights, mask, [(torch.tensor([1]), small)], ORIG[None])    # query 1: no mass -> NaN
    accumulator.update(0, weights, mask, [(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4))], ORIG[None])
    weights[0, :, 0, 0], weights[0, :, 0, 1] = 0.0, 1.0                              # outside the box
    accumulator.update(0, weights, mask, [(torch.tensor([0]), small)], ORIG[None])
    torch.testing.assert_close(accumulator.compute()["small", 0], torch.tensor([0.125, 0.125], dtype=torch.float64))


def test_the_report_reads_the_last_layers_head_mean_of_the_last_evaluation():
    rows = [{"global_step": 10, "paibb/all/layer_0/mean": 0.1, "paibb/all/layer_1/mean": 0.2},
            {"global_step": 20, "paibb/all/layer_0/mean": 0.3, "paibb/all/layer_1/mean": 0.4,
             "paibb/all/layer_1/head_0": 0.9, "paibb/small/layer_1/mean": 0.8}]
    assert logged_paibb(rows) == 0.4
    assert logged_paibb([{"global_step": 1}]) is None
