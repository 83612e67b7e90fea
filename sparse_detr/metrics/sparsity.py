"""How sparse is attention, per head: zero ratio, Gini index, support size, entropy, the support's
regions on the image grid (`regions`), and PAIBB.

Every row metric is taken over one query's weights on its image's real keys only: with images
of different sizes batched, padded keys and padded queries are no part of what the model
attends over, and must not move the numbers (a metric must not depend on batch composition).

Rows whose weights on the real keys are all zero are excluded from every metric: they are not
attention distributions (they come from fully masked queries), and counting them would make,
say, a Gini index of 0 or an entropy of 0 look like a finding.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import box_convert

from sparse_detr.metrics.names import SPARSITY_METRICS as METRICS  # noqa: F401 (the names of what this module computes)
from sparse_detr.metrics.regions import support_regions
from sparse_detr.sites import SITE_BY_NAME


def sparsity_sums(
    weights: Tensor,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    threshold: float = 1e-6,
    key_grid: tuple[int, int] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-head sums and counts of each metric, float64, so that batches add up exactly.

    weights: [batch, heads, queries, keys] attention weights (each live row sums to 1 on real keys).
    key_mask: [batch, keys], True on padded keys (None: no padding).
    query_mask: [batch, queries], True on padded queries; for encoder self-attention pass the
        key mask again (queries and keys are the same positions).
    threshold: weights <= threshold count as near zero, so dense (softmax) maps can be compared.
    key_grid: (H, W) of the padded feature map when the keys are its cells (row-major); None when
        they are not a grid (decoder self-attention), and then the GRID_METRICS are absent.
    Returns {metric: (sum [heads], count [heads])}; the mean is sum / count:
        zero_ratio, near_zero_ratio: share of the real-key weights that are 0 (resp. <= threshold),
            counted over all entries of the live rows;
        gini: Gini index of a row, 0 for uniform, (n - 1) / n for one-hot on n real keys;
        support: number of non-zero weights in a row;
        entropy: -sum w log w over a row (natural log, 0 log 0 = 0);
        regions, largest_region_share (key_grid only): 4-connected regions of a row's support on
            the grid, and the share of its mass in the heaviest one (`regions.support_regions`).
    """
    w = weights.detach().float()
    batch, _, queries, keys = w.shape
    real_key = torch.ones(batch, keys, dtype=torch.bool, device=w.device) if key_mask is None else ~key_mask
    real_query = torch.ones(batch, queries, dtype=torch.bool, device=w.device) if query_mask is None else ~query_mask
    real_key = real_key[:, None, None, :]  # [batch, 1, 1, keys]
    w = w.masked_fill(~real_key, 0.0)
    n = real_key.sum(-1).float()  # [batch, 1, 1]: real keys per image
    mass = w.sum(-1)  # [batch, heads, queries]
    live = real_query[:, None, :] & (mass > 0)  # [batch, heads, queries]

    zeros = ((w <= 0) & real_key).sum(-1).float()
    near_zeros = ((w <= threshold) & real_key).sum(-1).float()
    # Gini = sum_i (2i - n - 1) x_(i) / (n sum x), x_(1) <= ... <= x_(n) the real keys' weights.
    # Padded keys, filled with -1, sort first (as the first keys - n positions) and then count as 0.
    ranked = w.masked_fill(~real_key, -1.0).sort(dim=-1).values.clamp_min(0.0)
    position = torch.arange(1, keys + 1, device=w.device, dtype=w.dtype)
    coefficient = 2 * position - 2 * keys + n[..., None] - 1  # [batch, 1, 1, keys]
    gini = (coefficient * ranked).sum(-1) / (n * mass)
    entropy = torch.special.entr(w).sum(-1)

    rows = live.sum((0, 2)).double()

    def over_live_rows(values: Tensor) -> Tensor:  # [batch, heads, queries] -> [heads]
        return torch.where(live, values, 0.0).sum((0, 2)).double()

    entries = over_live_rows(n.expand_as(mass))
    sums = {
        "zero_ratio": (over_live_rows(zeros), entries),
        "near_zero_ratio": (over_live_rows(near_zeros), entries),
        "gini": (over_live_rows(gini), rows),
        "support": (over_live_rows(n - zeros), rows),
        "entropy": (over_live_rows(entropy), rows),
    }
    if key_grid is not None:
        regions, largest_share = support_regions(w[live].reshape(-1, *key_grid))  # live rows only
        head = live.nonzero()[:, 1].cpu()
        per_head = torch.zeros(w.shape[1], dtype=torch.float64)
        sums["regions"] = (per_head.index_add(0, head, regions.double()).to(rows), rows)
        sums["largest_region_share"] = (per_head.index_add(0, head, largest_share).to(rows), rows)
    return sums


def attention_sparsity(
    weights: Tensor,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    threshold: float = 1e-6,
    key_grid: tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """Per-head means of one batch: {metric: [heads]}; arguments as in `sparsity_sums`."""
    sums = sparsity_sums(weights, key_mask, query_mask, threshold, key_grid)
    return {name: total / count for name, (total, count) in sums.items()}


def site_layout(site: str, feature_mask: torch.Tensor) -> tuple[Tensor | None, Tensor | None, tuple[int, int] | None]:
    """(key mask, query mask, key grid) of a site's weights, masks True on padding: encoder
    self-attention is over the feature map both ways, cross-attention has padded grid keys only,
    decoder self-attention no padding and no grid. Unpacks into `SparsityAccumulator.update`."""
    cells = feature_mask.flatten(1)
    kind = SITE_BY_NAME[site]
    grid = tuple(feature_mask.shape[-2:]) if kind.grid_keys else None
    return (cells if kind.grid_keys else None), (cells if kind.grid_queries else None), grid


class SparsityAccumulator:
    """Sums and counts per (site, layer) over a validation pass.

    The result is the mean over all live rows seen, not a mean of batch means, which would weight
    rows by the size and padding of the batch they happened to fall in.
    """

    def __init__(self, threshold: float = 1e-6):
        self.threshold = threshold
        self._sums: dict[tuple[str, int], dict[str, tuple[Tensor, Tensor]]] = {}

    def update(
        self,
        site: str,
        layer: int,
        weights: Tensor,
        key_mask: Tensor | None = None,
        query_mask: Tensor | None = None,
        key_grid: tuple[int, int] | None = None,
    ) -> None:
        """Add one batch of one attention site and layer; arguments as in `sparsity_sums`."""
        new = sparsity_sums(weights, key_mask, query_mask, self.threshold, key_grid)
        old = self._sums.get((site, layer))
        if old is not None:
            new = {name: (old[name][0] + total, old[name][1] + count) for name, (total, count) in new.items()}
        self._sums[(site, layer)] = new

    def synchronize(self) -> None:
        """Add up the sums of all ranks (a collective: call it on every rank). No-op without a process group."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        local = {key: {name: (t.cpu(), c.cpu()) for name, (t, c) in sums.items()} for key, sums in self._sums.items()}
        gathered: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        self._sums = {}
        for part in gathered:
            for key, sums in part.items():
                old = self._sums.get(key)
                self._sums[key] = sums if old is None else {
                    name: (old[name][0] + total, old[name][1] + count) for name, (total, count) in sums.items()
                }

    def compute(self) -> dict[tuple[str, int], dict[str, Tensor]]:
        """{(site, layer): {metric: per-head mean [heads]}} over everything added so far."""
        return {key: {name: total / count for name, (total, count) in sums.items()} for key, sums in self._sums.items()}


def paibb(
    weights: Tensor,
    feature_mask: Tensor,
    matches: Sequence[tuple[Tensor, Tensor]],
) -> dict[str, Tensor]:
    """Percentage of attention inside the bounding box, for each Hungarian-matched (query, box) pair.

    weights: [batch, heads, queries, H * W] decoder cross-attention of one layer over the padded
        feature map (row-major, as DETR flattens it).
    feature_mask: [batch, H, W], True on padding (bottom and right, as collate pads images).
    matches: per image (query indices [M_i] int64, boxes [M_i, 4] cxcywh normalised to the
        unpadded image).
    Returns, with N = sum M_i pairs in image order:
        "per_head": [N, heads], "pair": [N] (mean over heads), "head_mean": [heads], "mean": [].

    Each image is scored on its own unpadded map (h_i, w_i): the image is split into h_i x w_i
    equal cells, and a cell's attention counts with the exact fraction of its area inside the
    box. This equals box (nearest) upsampling of the map onto the image and summing inside the
    box, without picking a resolution. The share is relative to the mass on the image's real
    cells, so neither padding nor the other images in the batch change it. A row with no mass
    there gives NaN, which the means skip.
    """
    heads, height, width = weights.shape[1], *feature_mask.shape[-2:]
    if len(matches) != weights.shape[0]:
        raise ValueError(f"paibb: {len(matches)} match lists for a batch of {weights.shape[0]}")
    per_image = []
    for image_weights, mask, (query_ids, boxes) in zip(weights.detach().float(), feature_mask, matches):
        rows, cols = int((~mask).any(1).sum()), int((~mask).any(0).sum())
        maps = image_weights[:, query_ids].reshape(heads, len(query_ids), height, width)
        maps = maps[..., :rows, :cols]  # [heads, M, h, w]: the image's own cells
        x0, y0, x1, y1 = box_convert(boxes.to(maps), "cxcywh", "xyxy").unbind(-1)
        inside = torch.einsum("kmyx,my,mx->mk", maps, _cell_overlap(y0, y1, rows), _cell_overlap(x0, x1, cols))
        per_image.append(inside / maps.sum((-2, -1)).T)
    per_head = torch.cat(per_image)
    return {
        "per_head": per_head,
        "pair": per_head.nanmean(1),
        "head_mean": per_head.nanmean(0),
        "mean": per_head.nanmean(),
    }


def _cell_overlap(low: Tensor, high: Tensor, cells: int) -> Tensor:
    """Fraction of each of `cells` equal cells of [0, 1] inside [low, high]: [M], [M] -> [M, cells]."""
    edges = torch.arange(cells + 1, device=low.device, dtype=low.dtype) / cells
    overlap = torch.minimum(high[:, None], edges[1:]) - torch.maximum(low[:, None], edges[:-1])
    return overlap.clamp_min(0.0) * cells
