"""Structured sparsity: how many 4-connected regions the support of an attention map has, and the
share of its mass in the largest one.

Zero ratio and support say *how many* keys get weight; these say *which shape* it has on the image
grid (TVMax's claim is a few contiguous blobs rather than scattered cells). Only maps whose keys
are the feature map have a shape: decoder self-attention gets no value at all.

The support is the cells with weight > 0. Padding is no part of it (padded keys are zeroed first),
and since collate pads at the bottom and right, an image's regions inside the padded map are its
regions alone. Labelling is scipy.ndimage.label over all maps of a batch at once (one C pass; a
structure without links along the map axis keeps the maps apart), then per-region masses by
bincount: no Python loop over maps.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

# 4-connectivity inside each [H, W] map, no connection between consecutive maps of the stack.
FOUR_NEIGHBOURS_PER_MAP = np.zeros((3, 3, 3), dtype=bool)
FOUR_NEIGHBOURS_PER_MAP[1] = ndimage.generate_binary_structure(2, 1)


def label_support(maps: Tensor) -> tuple[np.ndarray, int]:
    """maps [N, H, W] -> (labels [N, H, W] int, total): 0 off the support, 1..total the 4-connected
    regions of the cells with weight > 0, numbered through the whole stack (a region lies in one map)."""
    return ndimage.label((maps.detach().cpu() > 0).numpy(), structure=FOUR_NEIGHBOURS_PER_MAP)


def support_regions(maps: Tensor) -> tuple[Tensor, Tensor]:
    """maps [N, H, W] of non-negative weights -> (regions [N] int64, largest_share [N] float64).

    regions: number of 4-connected regions of the cells with weight > 0 (diagonal neighbours are
    separate regions); largest_share: mass of the heaviest region over the map's mass (NaN for a
    map with no mass)."""
    weights = maps.detach().to("cpu", torch.float64)
    count = weights.shape[0]
    labels, total = label_support(weights)
    labels = torch.from_numpy(labels).reshape(count, -1).long()
    if total == 0:
        return torch.zeros(count, dtype=torch.long), torch.full((count,), float("nan"), dtype=torch.float64)
    flat = labels.flatten()
    region_mass = torch.bincount(flat, weights=weights.flatten(), minlength=total + 1)[1:]
    cells = flat.nonzero().squeeze(1)
    map_of_region = torch.empty(total, dtype=torch.long)
    map_of_region[flat[cells] - 1] = cells // labels.shape[1]  # every cell of a region is in one map
    regions = torch.bincount(map_of_region, minlength=count)
    largest = torch.zeros(count, dtype=torch.float64).scatter_reduce(0, map_of_region, region_mass, "amax")
    return regions, largest / weights.flatten(1).sum(1)
