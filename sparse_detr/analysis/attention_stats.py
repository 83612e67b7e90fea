"""A trained model over a data split: COCO AP, attention sparsity per site/layer/head, and PAIBB.

The metrics are those of `sparse_detr.metrics` (SparsityAccumulator, paibb, CocoEvaluator); this
module only runs a trained model (`engine.trained_model`) and turns the results into rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Subset

from sparse_detr.sites import SITES
from sparse_detr.data.collate import collate
from sparse_detr.engine.loop import to_device
from sparse_detr.engine.trained_model import TrainedModel
from sparse_detr.metrics.coco_eval import CocoEvaluator
from sparse_detr.metrics.paibb_sizes import PaibbBySize, matched_pairs
from sparse_detr.metrics.sparsity import METRICS, SparsityAccumulator, paibb, site_layout
from sparse_detr.models.detr import build_model

SPARSITY_COLUMNS = ("site", "layer", "head", *METRICS)
PAIBB_COLUMNS = ("layer", "head", "paibb", "pairs")
PAIBB_SIZE_COLUMNS = ("size", "layer", "head", "paibb")


def initial_model(trained: TrainedModel, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The same model as the run's training started it: built from its config right after seeding
    torch with the run's seed, as the trainer does (without `init_from` weights). Torch's global
    random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(trained.cfg.seed)
        model, _, _ = build_model(trained.cfg)
    return model.to(device).eval()


@dataclass
class AttentionStats:
    """What one pass over a split measured."""
    sparsity: dict[tuple[str, int], dict[str, torch.Tensor]]  # (site, layer) -> metric -> per head [heads]
    paibb: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder layer -> per pair and head [N, heads]
    coco: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    paibb_by_size: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (size, layer) -> [heads]


@torch.no_grad()
def measure(model, criterion, postprocessor, dataset, *, num_images: int | None = None, batch_size: int = 4,
            threshold: float = 1e-6, paibb_layers: Sequence[int] = (-1,), device="cpu") -> AttentionStats:
    """Run the model over the first `num_images` of `dataset` (all if None), in order.

    paibb_layers: decoder layers (negative counts from the last) whose cross-attention is scored
    with PAIBB over the final layer's Hungarian matches (the query that ends up predicting a box).
    """
    count = len(dataset) if num_images is None else min(num_images, len(dataset))
    loader = DataLoader(Subset(dataset, range(count)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    num_layers = len(model.transformer.decoder.layers)
    layers = sorted({layer % num_layers for layer in paibb_layers})
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category)
    sparsity = SparsityAccumulator(threshold)
    pairs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    by_size = PaibbBySize()
    model.eval()
    for images, mask, targets in loader:
        images, mask, targets = to_device(images, mask, targets, device)
        outputs = model(images, mask, return_attention=True)
        results = postprocessor(outputs, torch.stack([t["orig_size"] for t in targets]))
        evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
        for site, weights in outputs["attention"].items():
            for layer, layer_weights in enumerate(weights):
                sparsity.update(site, layer, layer_weights.float(), *site_layout(site, outputs["feature_mask"]))
        matches = matched_pairs(criterion, outputs, targets)
        for layer in layers:
            scores = paibb(outputs["attention"]["cross"][layer], outputs["feature_mask"], matches)
            pairs[layer].append(scores["per_head"])
            by_size.update(layer, outputs["attention"]["cross"][layer], outputs["feature_mask"], matches,
                           torch.stack([t["orig_size"] for t in targets]))
    return AttentionStats(sparsity=sparsity.compute(), coco={**evaluator.compute(), **evaluator.class_ap}, num_images=count,
                          paibb={layer: torch.cat(parts) for layer, parts in pairs.items()},
                          paibb_by_size=by_size.compute())


def sparsity_rows(stats: AttentionStats) -> list[dict]:
    """One row per site, layer and head, plus a `head = "mean"` row per site and layer."""
    rows = []
    for (site, layer), metrics in sorted(stats.sparsity.items(), key=lambda kv: (SITES.index(kv[0][0]), kv[0][1])):
        heads = len(next(iter(metrics.values())))
        for head in [*range(heads), "mean"]:
            values = {name: float(v.mean() if head == "mean" else v[head]) for name, v in metrics.items()}
            rows.append({"site": site, "layer": layer, "head": head, **values})
    return rows


def paibb_size_rows(stats: AttentionStats) -> list[dict]:
    """One row per object size (all, small, medium, large), scored layer and head (and `head = "mean"`)."""
    return [{"size": size, "layer": layer, "head": head, "paibb": value}
            for (size, layer), per_head in sorted(stats.paibb_by_size.items())
            for head, value in [*enumerate(per_head.tolist()), ("mean", float(per_head.nanmean()))]]


def paibb_rows(stats: AttentionStats) -> list[dict]:
    """One row per decoder layer and head (and `head = "mean"`): PAIBB over the matched pairs."""
    rows = []
    for layer, per_pair in sorted(stats.paibb.items()):
        for head, value in [*enumerate(per_pair.nanmean(0).tolist()), ("mean", float(per_pair.nanmean()))]:
            rows.append({"layer": layer, "head": head, "paibb": value, "pairs": len(per_pair)})
    return rows


def site_summary(per_layer: dict[tuple[str, int], dict[str, float]]) -> dict[str, dict[str, float]]:
    """{(site, layer): {metric: head mean}} -> {site: {metric: mean over layers}} (every layer of a
    site sees the same rows, so this is the mean over all of the site's rows)."""
    summary: dict[str, dict[str, list[float]]] = {}
    for (site, _), metrics in per_layer.items():
        for name, value in metrics.items():
            summary.setdefault(site, {}).setdefault(name, []).append(value)
    return {site: {name: sum(v) / len(v) for name, v in metrics.items()} for site, metrics in summary.items()}


def summary_of(stats: AttentionStats) -> dict[str, dict[str, float]]:
    """Per site, each metric's mean over layers and heads; `cross` also gets `paibb` of the last
    scored layer (head mean)."""
    summary = site_summary({key: {name: float(v.mean()) for name, v in metrics.items()}
                            for key, metrics in stats.sparsity.items()})
    if stats.paibb:
        last = stats.paibb[max(stats.paibb)]
        summary.setdefault("cross", {})["paibb"] = float(last.nanmean())
    return summary

