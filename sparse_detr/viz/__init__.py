"""Figures: attention maps and detections, sparsity bars, learned alphas, sweep plots and curves.

Every function builds a `matplotlib.figure.Figure` directly (no pyplot), so figures are drawn
with the Agg canvas whatever backend the session uses, and nothing stays open in a global
figure manager. `save_figure` writes one file per format.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

FORMATS = ("png", "pdf", "svg")


def new_figure(rows: int = 1, cols: int = 1, *, cell: tuple[float, float] = (3.0, 3.0), **kwargs):
    """(figure, axes [rows, cols]) with each panel `cell` inches wide and high."""
    figure = Figure(figsize=(cell[0] * cols, cell[1] * rows), layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False, **kwargs)


def save_figure(figure: Figure, stem: str | Path, formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 100) -> list[Path]:
    """Write `<stem>.<format>` for each format; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"figure format {fmt!r}; choose from: {', '.join(FORMATS)}")
        path = stem.with_name(f"{stem.name}.{fmt}")
        figure.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
