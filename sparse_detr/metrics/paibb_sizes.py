"""PAIBB of every validation pass, by COCO object size, per decoder layer and head.

The thesis reported PAIBB (the share of a matched query's cross-attention inside its
ground-truth box, `sparsity.paibb`) averaged over heads; small objects are where sparse
attention should matter most. Here every matched pair is scored in every decoder layer, and
sums and counts are kept per (size, layer) and head, so batches and ranks add up exactly.

Sizes are COCO's, from the ground-truth box's area in original image pixels: small < 32^2,
medium < 96^2, large otherwise; "all" holds every pair.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from sparse_detr.metrics.sparsity import paibb
from sparse_detr.tracking import PAIBB
SIZES = ("small", "medium", "large")
ALL = "all"
SMALL_MAX_AREA, MEDIUM_MAX_AREA = 32.0 ** 2, 96.0 ** 2


def matched_pairs(criterion, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
    """Per image (matched query ids [M], their ground-truth boxes [M, 4] cxcywh), by the criterion's matcher."""
    matches = criterion.matcher(outputs, targets)
    return [(queries, target["boxes"][boxes.to(target["boxes"].device)])
            for (queries, boxes), target in zip(matches, targets)]


def size_classes(boxes: Tensor, orig_size: Tensor) -> Tensor:
    """Index into SIZES of each box: boxes [M, 4] cxcywh normalised to the image, orig_size [2] (h, w)."""
    height, width = orig_size.to(boxes).unbind(-1)
    area = boxes[:, 2] * width * boxes[:, 3] * height
    return (area >= SMALL_MAX_AREA).long() + (area >= MEDIUM_MAX_AREA).long()


class PaibbBySize:
    """Accumulates per-head PAIBB sums and counts per (size, decoder layer); NaN pairs are skipped."""

    def __init__(self):
        self._sums: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}

    def update(self, layer: int, cross_weights: Tensor, feature_mask: Tensor,
               matches: Sequence[tuple[Tensor, Tensor]], orig_sizes: Tensor) -> None:
        """cross_weights [batch, heads, queries, H * W] of one decoder layer; matches and
        feature_mask as `sparsity.paibb` takes them; orig_sizes [batch, 2] (h, w)."""
        if not sum(len(queries) for queries, _ in matches):
            return
        per_head = paibb(cross_weights, feature_mask, matches)["per_head"].double().cpu()   # [N, heads]
        sizes = torch.cat([size_classes(boxes, size) for (_, boxes), size in zip(matches, orig_sizes)]).cpu()
        for name, chosen in [(ALL, torch.ones_like(sizes, dtype=torch.bool)),
                             *((name, sizes == index) for index, name in enumerate(SIZES))]:
            values = per_head[chosen]
            if len(values):
                self._add((name, layer), values.nan_to_num(0.0).sum(0), (~values.isnan()).sum(0).double())

    def _add(self, key, total: Tensor, count: Tensor) -> None:
        old = self._sums.get(key)
        self._sums[key] = (total, count) if old is None else (old[0] + total, old[1] + count)

    def synchronize(self) -> None:
        """Add up the sums of all ranks (a collective: call it on every rank). No-op without a process group."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[dict | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._sums)
        self._sums = {}
        for part in gathered:
            for key, (total, count) in part.items():
                self._add(key, total, count)

    def compute(self) -> dict[tuple[str, int], Tensor]:
        """{(size, layer): per-head mean PAIBB [heads]} (NaN for a head with no scored pair)."""
        return {key: total / count for key, (total, count) in self._sums.items()}


def paibb_metrics(values: dict[tuple[str, int], Tensor]) -> dict[str, float]:
    """`paibb/<size>/layer_<l>/head_<h>` and `paibb/<size>/layer_<l>/mean` (the mean over heads:
    PAIBB of the head-averaged attention, the number the thesis reported)."""
    metrics = {}
    for (size, layer), per_head in sorted(values.items()):
        for head, value in enumerate(per_head.tolist()):
            metrics[f"{PAIBB}/{size}/layer_{layer}/head_{head}"] = value
        metrics[f"{PAIBB}/{size}/layer_{layer}/mean"] = float(per_head.nanmean())
    return metrics
