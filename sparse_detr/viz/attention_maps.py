"""Detections and decoder cross-attention maps drawn over the image.

Coordinates are those of the image the model saw (after the val transforms): boxes are xyxy
pixels of that image, and an attention map covers the unpadded part of the feature map, stretched
over the whole image (each feature cell is an equal share of the image, as PAIBB counts it).
Every overlay outlines the 4-connected regions of the map's support (`metrics.regions`, the
labelling the logged `regions` metric uses), so the picture shows the shape that metric counts.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle

from sparse_detr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sparse_detr.metrics.regions import label_support, support_regions
from sparse_detr.viz import new_figure

GT_COLOR, PRED_COLOR, REGION_COLOR = "lime", "red", "cyan"
Boxes = Sequence[tuple[Sequence[float], str, str]]  # (xyxy box, color, caption)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """A normalised [3, H, W] image tensor -> [H, W, 3] floats in [0, 1] for imshow."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.detach().cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def query_attention_maps(outputs: dict, query: int, image: int = 0) -> np.ndarray:
    """Cross-attention of one query of one image in every decoder layer and head, on the image's
    unpadded feature map: outputs of `model(..., return_attention=True)` -> [layers, heads, h, w]."""
    mask = outputs["feature_mask"][image]  # [H, W], True on padding
    rows, cols = int((~mask).any(1).sum()), int((~mask).any(0).sum())
    weights = torch.stack([layer[image, :, query] for layer in outputs["attention"]["cross"]])  # [L, heads, H*W]
    return weights.reshape(*weights.shape[:2], *mask.shape)[..., :rows, :cols].detach().float().cpu().numpy()


def region_outlines(labels: np.ndarray, cell_width: float, cell_height: float) -> list[np.ndarray]:
    """The boundary of each region of `labels` [h, w] (0: no region, 1..n: regions) along the cell
    edges: per region, in label order, its segments [k, 2, 2] as (x, y) points of the image, where
    cell (i, j) covers x in [j, j + 1] * cell_width and y in [i, i + 1] * cell_height."""
    padded = np.pad(labels, 1)
    starts, ends, owners = [], [], []
    # an edge between two cells of different labels bounds both; rows of `padded` meet along a
    # horizontal edge, columns along a vertical one
    for first, second, step in ((padded[:-1, 1:-1], padded[1:, 1:-1], (1, 0)),
                                (padded[1:-1, :-1], padded[1:-1, 1:], (0, 1))):
        rows, cols = np.nonzero(first != second)
        start = np.stack([cols, rows], 1)
        for side in (first, second):
            starts.append(start)
            ends.append(start + step)
            owners.append(side[rows, cols])
    owners = np.concatenate(owners)
    segments = np.stack([np.concatenate(starts), np.concatenate(ends)], 1) * np.array([cell_width, cell_height])
    bounding = owners > 0
    order = np.argsort(owners[bounding], kind="stable")
    counts = np.bincount(owners[bounding], minlength=int(labels.max()) + 1)[1:]
    return np.split(segments[bounding][order], np.cumsum(counts)[:-1]) if len(counts) else []


def region_caption(values: np.ndarray) -> str:
    """'<n> regions, largest <share>' of one map [h, w]: its support's 4-connected regions and the
    share of its mass in the heaviest."""
    regions, largest = support_regions(torch.as_tensor(values)[None])
    count = int(regions[0])
    if count == 0:
        return "no support"
    return f"{count} region{'' if count == 1 else 's'}, largest {float(largest[0]):.0%}"


def draw_attention(ax, picture: np.ndarray, values: np.ndarray) -> str:
    """One attention map [h, w] over the image: coloured from 0 to its maximum, exact zeros
    transparent, each 4-connected region of its support outlined (one LineCollection each);
    returns `region_caption(values)` for the panel's title."""
    height, width = picture.shape[:2]
    ax.imshow(picture)
    ax.imshow(np.ma.masked_equal(values, 0.0), extent=(0, width, height, 0), cmap="inferno", alpha=0.6,
              vmin=0.0, vmax=max(float(values.max()), 1e-12), interpolation="nearest")
    labels, _ = label_support(torch.as_tensor(values)[None])
    for segments in region_outlines(labels[0], width / values.shape[1], height / values.shape[0]):
        ax.add_collection(LineCollection(segments, colors=REGION_COLOR, linewidths=0.8), autolim=False)
    return region_caption(values)


def draw_boxes(ax, boxes: Boxes) -> None:
    for (x0, y0, x1, y1), color, caption in boxes:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        if caption:  # ground truth captioned below its box, predictions above
            below = color == GT_COLOR
            ax.text(x0, y1 if below else y0, caption, color="black", fontsize=7, va="top" if below else "bottom",
                    bbox={"facecolor": color, "alpha": 0.7, "pad": 1, "linewidth": 0})


def show_image(ax, picture: np.ndarray, boxes: Boxes = (), title: str = "") -> None:
    ax.imshow(picture)
    draw_boxes(ax, boxes)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def detections_figure(picture: np.ndarray, boxes: Boxes, title: str = "", size: float = 5.0):
    """The image with ground-truth and predicted boxes, one panel."""
    figure, axes = new_figure(cell=(size, size * picture.shape[0] / picture.shape[1]))
    show_image(axes[0, 0], picture, boxes, title)
    return figure


def cross_attention_figure(picture: np.ndarray, maps: np.ndarray, boxes: Boxes = (), title: str = "",
                           cell: float = 2.0):
    """One row per decoder layer: the image with `boxes`, then each head's map over it.

    maps: [layers, heads, h, w]. Each map is coloured from 0 to its own maximum; exact zeros are
    left transparent, so a sparse map shows its support as the coloured cells, its regions outlined
    and counted in the panel's title.
    """
    layers, heads, h, w = maps.shape
    height, width = picture.shape[:2]
    figure, axes = new_figure(layers, heads + 1, cell=(cell, cell * height / width))
    for layer in range(layers):
        show_image(axes[layer, 0], picture, boxes, f"layer {layer}")
        for head in range(heads):
            values = maps[layer, head]
            ax = axes[layer, head + 1]
            regions = draw_attention(ax, picture, values)
            draw_boxes(ax, [(box, color, "") for box, color, _ in boxes])
            ax.set_title(f"head {head}: {int((values > 0).sum())}/{h * w} cells\n{regions}", fontsize=8)
            ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def variant_attention_figure(picture: np.ndarray, box: Sequence[float], columns: Sequence[tuple[str, np.ndarray]],
                             title: str = "", cell: float = 2.0):
    """The same object in the same image, one column per variant, one row per decoder layer: the
    head-averaged cross-attention of the query matched to it, over the image with its box.

    columns: (variant label, maps [layers, h, w]); each map coloured from 0 to its own maximum,
    exact zeros transparent, the regions of its support (the union of the heads') outlined and
    counted in the title."""
    layers = max(maps.shape[0] for _, maps in columns)
    height, width = picture.shape[:2]
    figure, axes = new_figure(layers, len(columns), cell=(cell, cell * height / width))
    for col, (label, maps) in enumerate(columns):
        for layer in range(layers):
            ax = axes[layer, col]
            ax.set_axis_off()
            if layer >= maps.shape[0]:
                continue
            caption = f"layer {layer}: {draw_attention(ax, picture, maps[layer])}"
            draw_boxes(ax, [(box, GT_COLOR, "")])
            ax.set_title(f"{textwrap.fill(label, 30)}\n{caption}" if layer == 0 else caption, fontsize=7)
    if title:  # wrapped to the figure's width (about 15 characters an inch at this size)
        figure.suptitle(textwrap.fill(title, max(30, int(15 * cell * len(columns)))), fontsize=8)
    return figure
