"""Figures of `sparse-detr-predict`: an image with its detections, and each detection's
cross-attention over the image."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparse_detr.viz import new_figure
from sparse_detr.viz.attention_maps import PRED_COLOR, detections_figure, draw_attention, draw_boxes

MAX_COLUMNS = 4


def captions(scores: Sequence[float], labels: Sequence[int], names: Sequence[str]) -> list[str]:
    return [f"{names[label]} {score:.2f}" for score, label in zip(scores, labels)]


def prediction_figure(picture: np.ndarray, boxes: Sequence[Sequence[float]], texts: Sequence[str], title: str):
    """The image ([H, W, 3] in [0, 1]) with each box (xyxy pixels) and its caption."""
    return detections_figure(picture, [(box, PRED_COLOR, text) for box, text in zip(boxes, texts)], title)


def detection_attention_figure(picture: np.ndarray, maps: np.ndarray, boxes: Sequence[Sequence[float]],
                               texts: Sequence[str], cell: float = 3.0):
    """One panel per detection: its box and its cross-attention map ([K, h, w], stretched over the
    image, coloured from 0 to the map's maximum; exact zeros left transparent), the regions of its
    support outlined and counted in the panel's title."""
    count = max(len(boxes), 1)
    cols = min(count, MAX_COLUMNS)
    rows = -(-count // cols)
    height, width = picture.shape[:2]
    figure, axes = new_figure(rows, cols, cell=(cell, cell * height / width))
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= len(boxes):
            continue
        ax.set_title(draw_attention(ax, picture, maps[index]), fontsize=8)
        draw_boxes(ax, [(boxes[index], PRED_COLOR, texts[index])])
    if not len(boxes):
        axes[0, 0].imshow(picture)
        axes[0, 0].set_title("no detection above the threshold", fontsize=8)
    return figure
