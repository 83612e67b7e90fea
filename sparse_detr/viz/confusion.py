"""The confusion matrix of `sparse-detr-eval` as a heatmap with its counts."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparse_detr.viz import new_figure


def confusion_figure(matrix: np.ndarray, names: Sequence[str], title: str = ""):
    """matrix [C + 1, C + 1] (rows ground truth, columns predicted, last background); names: the C classes."""
    labels = [*names, "background"]
    side = max(4.0, 0.45 * len(labels) + 1.5)
    figure, axes = new_figure(cell=(side, side))
    ax = axes[0, 0]
    image = ax.imshow(matrix, cmap="Blues")
    if len(labels) <= 30:  # counts stay readable
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.8)
    return figure
