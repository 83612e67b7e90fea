"""Training curves of several runs on shared axes, read from their `metrics.jsonl`."""
from __future__ import annotations

from collections.abc import Sequence

from sparse_detr.analysis.run_folders import series
from sparse_detr.tracking import axis_of
from sparse_detr.viz import new_figure


def training_curves_figure(runs: Sequence[tuple[str, str, list[dict]]], keys: Sequence[str]):
    """One panel per metric key, one line per run, against the key's own axis (global_step or epoch).

    runs: (label, color, metrics.jsonl rows); give the seeds of one variant the same color."""
    figure, axes = new_figure(1, len(keys), cell=(4.0, 3.0))
    for ax, key in zip(axes[0], keys):
        for label, color, rows in runs:
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, color=color, label=label, marker="." if len(xs) < 20 else None)
        ax.set_xlabel(axis_of(key))
        ax.set_title(key, fontsize=9)
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    if legend:
        figure.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(3, len(legend)), fontsize=7)
    return figure
