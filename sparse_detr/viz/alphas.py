"""The learned alpha (or another learned mapping parameter, e.g. TVMax's lambda) of every head and
layer: a heatmap of the trained model, and its trajectories over training (from `metrics.jsonl`)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sparse_detr.analysis.run_folders import parse_site_key
from sparse_detr.sites import SITES
from sparse_detr.viz import new_figure
from sparse_detr.viz.sparsity_plots import site_title


def alpha_grids(alphas: Mapping[str, float]) -> dict[str, np.ndarray]:
    """{`alpha/<site>/layer_<l>/head_<h>`: value} (as `engine.loop.learned_mapping_values` gives and the
    log holds) -> {site: [layers, heads]}, NaN where a layer has no learned alpha."""
    cells = {parse_site_key(key): value for key, value in alphas.items()}
    grids = {}
    for site in SITES:
        own = {(layer, int(head.removeprefix("head_"))): v for (s, layer, head), v in cells.items() if s == site}
        if own:
            grid = np.full((max(l for l, _ in own) + 1, max(h for _, h in own) + 1), np.nan)
            for (layer, head), value in own.items():
                grid[layer, head] = value
            grids[site] = grid
    return grids


def alpha_heatmap_figure(grids: Mapping[str, np.ndarray], name: str = "alpha"):
    """One layer x head heatmap per site, each cell annotated with its value of `name` (colour
    scale 1 to 2 for alpha, the values' range otherwise); grids as `alpha_grids` gives for any group."""
    figure, axes = new_figure(1, len(grids), cell=(3.5, 3.0))
    scale = {"vmin": 1.0, "vmax": 2.0} if name == "alpha" else {}
    for ax, (site, grid) in zip(axes[0], grids.items()):
        image = ax.imshow(grid, cmap="coolwarm", aspect="auto", **scale)
        for (layer, head), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(head, layer, f"{value:.3f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}, {site_title(site)}", fontsize=9)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    return figure


def alpha_trajectories_figure(trajectories: Mapping[str, list], name: str = "alpha"):
    """Rows: sites; columns: layers; one line per head of `name` against global_step.

    trajectories: `run_folders.alpha_trajectories(rows, name)`, {site: [(layer, steps, [per head values])]}."""
    cols = max(len(layers) for layers in trajectories.values())
    figure, axes = new_figure(len(trajectories), cols, cell=(3.0, 2.5), sharey=True)
    for row, (site, layers) in enumerate(trajectories.items()):
        for col, (layer, steps, heads) in enumerate(layers):
            ax = axes[row, col]
            for head, values in enumerate(heads):
                ax.plot(steps, values, label=f"head {head}")
            ax.set_title(f"{site}, layer {layer}", fontsize=9)
            ax.set_xlabel("global_step")
            ax.set_ylabel(name)
        for col in range(len(layers), cols):
            axes[row, col].set_visible(False)
    axes[0, 0].legend(fontsize=7)
    return figure
