"""Figures: attention maps of a tiny model drawn over the image, sparsity bars, alphas, curves."""
import math

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from sparse_detr import build_model, load_config
from sparse_detr.engine.loop import learned_mapping_values
from sparse_detr.viz import save_figure
from sparse_detr.viz.alphas import alpha_grids, alpha_heatmap_figure, alpha_trajectories_figure
from sparse_detr.viz.attention_maps import (cross_attention_figure, denormalize, detections_figure, query_attention_maps,
                                            variant_attention_figure)
from sparse_detr.viz.predictions import detection_attention_figure
from sparse_detr.viz.curves import training_curves_figure
from sparse_detr.viz.sparsity_plots import ap_vs_sparsity_figure, sparsity_bars_figure

TINY = ["experiment=smoke", "model.num_classes=4"]


@pytest.fixture(scope="module")
def tiny_outputs():
    """A random tiny model run on two images of different sizes (the second is padded)."""
    torch.manual_seed(0)
    model, _, _ = build_model(load_config([*TINY, "attention=sparsemax", "placement=cross", "attention.impl=eager"]))
    images = [torch.randn(3, 64, 96), torch.randn(3, 40, 50)]
    with torch.no_grad():
        return model.eval()(images, return_attention=True), images


def rgba(figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255


def test_attention_overlay_png_exists_has_the_right_size_and_is_not_blank(tiny_outputs, tmp_path):
    outputs, images = tiny_outputs
    maps = query_attention_maps(outputs, query=3)
    assert maps.shape == (2, 4, *outputs["feature_mask"].shape[1:])  # [layers, heads, h, w], image 0 is unpadded
    figure = cross_attention_figure(denormalize(images[0]), maps, [([10, 5, 60, 40], "red", "q3")], "query 3", cell=2.0)
    paths = save_figure(figure, tmp_path / "overlay", ["png", "pdf"], dpi=50)
    assert [p.name for p in paths] == ["overlay.png", "overlay.pdf"] and all(p.stat().st_size > 0 for p in paths)
    pixels = matplotlib.image.imread(paths[0])
    # 2 layers x (4 heads + the image) panels of 2 x 2 * 64 / 96 inches, at 50 dpi
    assert pixels.shape[:2] == (round(2 * 2.0 * 64 / 96 * 50), round(5 * 2.0 * 50))
    assert pixels[..., :3].std() > 0.05


def test_maps_of_a_padded_image_cover_only_its_own_feature_cells(tiny_outputs):
    outputs, _ = tiny_outputs
    mask = outputs["feature_mask"][1]
    rows, cols = int((~mask).any(1).sum()), int((~mask).any(0).sum())
    assert rows * cols < mask.numel()  # the test needs padding
    maps = query_attention_maps(outputs, query=0, image=1)
    assert maps.shape == (2, 4, rows, cols)
    # sparsemax at the cross site: each map is a distribution over the real cells, with exact zeros
    np.testing.assert_allclose(maps.sum((-2, -1)), 1.0, atol=1e-5)
    assert (maps == 0).any()


def test_zero_attention_is_transparent_and_nonzero_is_coloured():
    picture = np.full((20, 40, 3), 0.5)
    maps = np.array([[[[0.0, 1.0]]]])  # one layer, one head, one row of two cells: left zero, right all
    pixels = rgba(cross_attention_figure(picture, maps, cell=2.0))
    height, width = pixels.shape[:2]
    overlay_row = pixels[height // 2, width // 2:]  # the second panel holds the overlay
    grey = np.all(np.abs(overlay_row - 0.5) < 0.01, axis=-1)
    coloured = np.abs(overlay_row - 0.5).max(-1) > 0.1
    assert grey.sum() > 10 and coloured.sum() > 10
    assert np.flatnonzero(grey).mean() < np.flatnonzero(coloured).mean()  # grey on the left, colour on the right


TWO_BLOBS = np.array([[0.5, 0.2, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.3],
                      [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)  # two cells side by side and a lone cell: 70% and 30%


def outline_boxes(ax) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) of each drawn region outline (a LineCollection each), in drawing order."""
    boxes = []
    for outline in ax.collections:
        points = np.concatenate(outline.get_segments())
        boxes.append((*points.min(0), *points.max(0)))
    return boxes


def test_each_region_of_the_support_is_outlined_and_counted_in_every_overlay():
    picture = np.zeros((30, 40, 3))   # 3 x 4 cells of 10 x 10 pixels
    panels = [cross_attention_figure(picture, TWO_BLOBS[None, None]).axes[1],
              variant_attention_figure(picture, [0, 0, 5, 5], [("sparsemax", TWO_BLOBS[None])]).axes[0],
              detection_attention_figure(picture, TWO_BLOBS[None], [[0, 0, 5, 5]], ["ring 0.9"]).axes[0]]
    for ax in panels:
        assert "2 regions, largest 70%" in ax.get_title()
        # the two cells top left, the lone cell in row 1, column 3, each along its cell edges
        assert outline_boxes(ax) == [(0, 0, 20, 10), (30, 10, 40, 20)]
        assert [len(outline.get_segments()) for outline in ax.collections] == [6, 4]


def test_a_dense_map_is_one_region_outlined_along_the_image_border():
    picture = np.zeros((30, 40, 3))
    ax = cross_attention_figure(picture, np.full((1, 1, 3, 4), 1 / 12)).axes[1]
    assert ax.get_title().endswith("1 region, largest 100%") and outline_boxes(ax) == [(0, 0, 40, 30)]


def test_detections_figure_draws_boxes_with_captions(tmp_path):
    picture = np.zeros((32, 48, 3))
    figure = detections_figure(picture, [([2, 2, 20, 20], "lime", "cross"), ([10, 8, 40, 30], "red", "q1 ring 0.91")])
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert texts == ["cross", "q1 ring 0.91"] and len(figure.axes[0].patches) == 2


def test_alpha_grids_and_heatmap_from_a_model_with_learned_alphas(tmp_path):
    cfg = load_config([*TINY, "attention=alpha_entmax", "placement=decoder_all", "attention.impl=eager"])
    model, _, _ = build_model(cfg)
    grids = alpha_grids(learned_mapping_values(model))
    assert set(grids) == {"decoder", "cross"} and all(g.shape == (2, 4) for g in grids.values())
    assert np.allclose(grids["cross"], 1.5, atol=1e-5)
    (path,) = save_figure(alpha_heatmap_figure(grids), tmp_path / "alphas", ["png"])
    assert matplotlib.image.imread(path)[..., :3].std() > 0.05


def test_alpha_grid_leaves_missing_heads_nan():
    grids = alpha_grids({"alpha/cross/layer_1/head_2": 1.7})
    assert grids["cross"].shape == (2, 3) and grids["cross"][1, 2] == 1.7 and np.isnan(grids["cross"][0, 0])


def test_sparsity_bars_alpha_trajectories_scatter_and_curves_render(tmp_path):
    values = {(site, layer): torch.rand(4) for site in ("encoder", "cross") for layer in range(3)}
    figure = sparsity_bars_figure(values, "gini")
    assert len(figure.axes) == 2 and len(figure.axes[1].patches) == 12
    trajectories = {"cross": [(0, [1, 2, 3], [[1.5, 1.6, 1.7], [1.5, 1.4, 1.3]]), (1, [1, 2, 3], [[1.5] * 3] * 2)]}
    assert len(alpha_trajectories_figure(trajectories).axes[0].lines) == 2
    points = {"cross": [("sparsemax", 0.4, 0.01, 0.30, 0.02), ("softmax", 0.0, math.nan, 0.28, math.nan)],
              "encoder": []}
    figure = ap_vs_sparsity_figure(points)
    assert len(figure.axes) == 1  # sites without points get no panel
    loss = "train-metrics/loss_bbox_unscaled"
    rows = [{"global_step": 1, loss: 0.9}, {"global_step": 2, loss: 0.8}, {"global_step": 2, loss: 0.7},
            {"epoch": 1, "val-epoch-metrics/AP": 0.1}]
    figure = training_curves_figure([("run a", "C0", rows), ("run b", "C1", rows[:1])],
                                    [loss, "val-epoch-metrics/AP"])
    (line, _), (ap_line,) = figure.axes[0].lines, figure.axes[1].lines
    assert list(line.get_ydata()) == [0.9, 0.7]  # a step logged twice keeps its last value
    assert figure.axes[1].get_xlabel() == "epoch" and list(ap_line.get_xdata()) == [1]
    for i, fig in enumerate([figure, sparsity_bars_figure(values, "gini")]):
        assert save_figure(fig, tmp_path / f"f{i}", ["svg"])[0].stat().st_size > 0


def test_save_figure_rejects_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="png, pdf, svg"):
        save_figure(detections_figure(np.zeros((4, 4, 3)), []), tmp_path / "x", ["jpg2"])
