"""Sparsity per layer and head (bars), and AP against sparsity across the variants of a sweep."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from sparse_detr.sites import SITE_BY_NAME, SITES
from sparse_detr.viz import new_figure


def site_title(site: str) -> str:
    """A panel title: the site's long name, or the key itself if it is not a site."""
    return SITE_BY_NAME[site].title if site in SITE_BY_NAME else site


def sparsity_bars_figure(values: Mapping[tuple[str, int], Sequence[float]], metric: str):
    """One panel per site; per layer, one bar per head. values: {(site, layer): per-head values}."""
    sites = [site for site in SITES if any(s == site for s, _ in values)]
    figure, axes = new_figure(1, len(sites), cell=(4.0, 3.0))
    for ax, site in zip(axes[0], sites):
        layers = sorted(layer for s, layer in values if s == site)
        heads = len(values[(site, layers[0])])
        width = 0.8 / heads
        for head in range(heads):
            ax.bar([layer - 0.4 + width * (head + 0.5) for layer in layers],
                   [float(values[(site, layer)][head]) for layer in layers], width, label=f"head {head}")
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_title(site_title(site), fontsize=9)
        ax.set_ylabel(metric)
        ax.set_ylim(bottom=0)
    axes[0, -1].legend(fontsize=7, loc="best")
    return figure


def ap_vs_sparsity_figure(points: Mapping[str, Sequence[tuple[str, float, float, float, float]]],
                          x_label: str = "zero_ratio", y_label: str = "AP"):
    """One panel per site: each variant as a point (mean) with error bars (std across seeds).

    points: {site: [(variant label, x, x_std, y, y_std), ...]}; NaN stds draw no bar."""
    sites = [site for site in SITES if points.get(site)]
    labels = list(dict.fromkeys(label for site in sites for label, *_ in points[site]))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    figure, axes = new_figure(1, max(1, len(sites)), cell=(4.0, 3.5))
    for ax, site in zip(axes[0], sites):
        for label, x, x_std, y, y_std in points[site]:
            ax.errorbar(x, y, xerr=_bar(x_std), yerr=_bar(y_std), fmt="o", color=colors[label], capsize=3, label=label)
        ax.set_xlabel(f"{site} {x_label}")
        ax.set_ylabel(y_label)
        ax.set_title(site_title(site), fontsize=9)
    if labels:
        handles = [axes[0, 0].plot([], [], "o", color=colors[label])[0] for label in labels]
        figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=7)
    return figure


def _bar(std: float):
    return None if std is None or math.isnan(std) else np.abs(std)
