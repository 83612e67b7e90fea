"""DETR's set criterion: the losses computed after Hungarian matching, and how they are weighted.

Follows the loss part of facebookresearch/detr `models/detr.py` (SetCriterion). For each decoder
output the predictions are matched to the targets, then
- `loss_ce`: cross-entropy over all queries, unmatched ones targeting "no object" (the last class),
  whose weight is `eos_coef` because most queries are unmatched;
- `loss_bbox`, `loss_giou`: L1 and 1 - GIoU over the matched pairs, divided by the number of
  target boxes in the global batch (so every box counts the same whatever the batch layout);
- `class_error`, `cardinality_error`: logged only, never optimised (they have no gradient).
With auxiliary decoding losses each intermediate decoder layer i gets the same losses, keyed
with the suffix `_i` (`class_error` is left out for them, as in DETR).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from sparse_detr.matching.matcher import HungarianMatcher, build_matcher

LOSS_NAMES = ("labels", "boxes", "cardinality")
Indices = list[tuple[Tensor, Tensor]]


class SetCriterion(nn.Module):
    """Unweighted DETR losses; `weight_dict` (kept as an attribute for the training loop) says how to sum them."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1, losses: Sequence[str] = LOSS_NAMES):
        super().__init__()
        unknown = [name for name in losses if name not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; choose from: {', '.join(LOSS_NAMES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.losses = tuple(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]], return_indices: bool = False):
        """Unweighted losses, or (losses, indices) with `return_indices`.

        outputs: "pred_logits" [batch_size, num_queries, num_classes + 1], "pred_boxes"
        [batch_size, num_queries, 4] normalised cxcywh, optionally "aux_outputs": a list of dicts
        with the same two keys, one per intermediate decoder layer.
        targets: per image, "labels" [num_targets] int64 and "boxes" [num_targets, 4] normalised cxcywh,
        on the outputs' device.
        indices: the final layer's match, one (pred_idx, tgt_idx) pair of int64 CPU tensors per image.

        Every decoder layer gets DETR's losses, computed for all layers at once (a few dozen small
        tensor ops instead of that many per layer: with the aux losses of a 6-layer decoder this
        was a tenth of a small model's training step).
        """
        layers = [outputs, *outputs.get("aux_outputs", ())]
        logits = torch.stack([layer["pred_logits"] for layer in layers])  # [layers, batch, queries, classes + 1]
        boxes = torch.stack([layer["pred_boxes"] for layer in layers])    # [layers, batch, queries, 4]
        indices = self.matcher.match_layers(logits, boxes, targets)
        matched = _Matched.of(indices, targets, logits.device)
        num_boxes = _num_boxes(targets, logits.device)
        per_layer: dict[str, Tensor] = {}
        if "labels" in self.losses:
            per_layer["loss_ce"] = self._loss_ce(logits, matched)
            per_layer["class_error"] = self._class_error(logits[0], matched)[None]  # (final layer only)
        if "boxes" in self.losses:
            per_layer.update(self._box_losses(boxes, matched, len(layers), num_boxes))
        if "cardinality" in self.losses:
            per_layer["cardinality_error"] = self._cardinality_error(logits, targets)
        keys = [key for name in self.losses for key in LOSS_KEYS[name]]
        losses = {}
        for i in range(len(layers)):
            suffix = "" if i == 0 else f"_{i - 1}"
            losses.update({key + suffix: per_layer[key][i] for key in keys if i == 0 or key != "class_error"})
        return (losses, indices[0]) if return_indices else losses

    def _loss_ce(self, logits: Tensor, matched: "_Matched") -> Tensor:
        """`loss_ce` per layer [layers]: cross-entropy over all queries, unmatched ones targeting
        "no object"; DETR's class-weighted mean (sum of weight x loss / sum of weights) per layer."""
        target_classes = torch.full(logits.shape[:3], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[matched.layer, matched.image, matched.query] = matched.labels
        weighted = F.cross_entropy(logits.permute(0, 3, 1, 2), target_classes, self.empty_weight, reduction="none")
        return weighted.flatten(1).sum(1) / self.empty_weight[target_classes].flatten(1).sum(1)

    @torch.no_grad()
    def _class_error(self, logits: Tensor, matched: "_Matched") -> Tensor:
        """Top-1 error in percent of the final layer's matched queries; 100 with none, as in DETR,
        so logs stay comparable with DETR's."""
        final = matched.layer == 0
        correct = (logits[matched.image[final], matched.query[final]].argmax(-1) == matched.labels[final]).float()
        return 100 - (correct.mean() * 100 if correct.numel() else correct.new_zeros(()))

    def _box_losses(self, boxes: Tensor, matched: "_Matched", layers: int, num_boxes: float) -> dict[str, Tensor]:
        """`loss_bbox` (L1 on normalised cxcywh) and `loss_giou` (1 - GIoU) per layer [layers],
        summed over matched pairs / num_boxes."""
        pred = boxes[matched.layer, matched.image, matched.query]  # [matched pairs of all layers, 4]
        target = matched.boxes.to(pred.dtype)
        giou = _paired_giou(box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"))
        per_pair = torch.stack([(pred - target).abs().sum(1), 1 - giou], 1)
        sums = per_pair.new_zeros(layers, 2).index_add_(0, matched.layer, per_pair)
        return {"loss_bbox": sums[:, 0] / num_boxes, "loss_giou": sums[:, 1] / num_boxes}

    @torch.no_grad()
    def _cardinality_error(self, logits: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """Per layer [layers]: mean absolute difference between the number of queries whose arg-max
        is not "no object" and the number of targets, per image."""
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(2).float()  # [layers, batch]
        actual = torch.as_tensor([len(t["labels"]) for t in targets], dtype=torch.float, device=logits.device)
        return (predicted - actual).abs().mean(1)


# The keys each loss name writes, in DETR's order.
LOSS_KEYS = {"labels": ("loss_ce", "class_error"), "boxes": ("loss_bbox", "loss_giou"),
             "cardinality": ("cardinality_error",)}


class _Matched(NamedTuple):
    """The matched (prediction, target) pairs of every layer, flat: layer, image and query index of
    each prediction, with its target's label and box."""
    layer: Tensor
    image: Tensor
    query: Tensor
    labels: Tensor
    boxes: Tensor

    @classmethod
    def of(cls, indices: list[Indices], targets: list[dict[str, Tensor]], device) -> "_Matched":
        """From the matcher's pairs of each layer and image (a handful of ops, not a few per image)."""
        first_target = torch.tensor([0] + [len(t["labels"]) for t in targets]).cumsum(0)[:-1]
        counts = torch.tensor([[len(src) for src, _ in layer] for layer in indices])  # [layers, images]
        layer = torch.arange(counts.shape[0]).repeat_interleave(counts.sum(1))
        image = torch.arange(counts.shape[1]).repeat(counts.shape[0]).repeat_interleave(counts.flatten())
        query = torch.cat([src for layer_indices in indices for src, _ in layer_indices])
        target = torch.cat([tgt for layer_indices in indices for _, tgt in layer_indices]) + first_target[image]
        target = target.to(device)
        labels = torch.cat([t["labels"] for t in targets]).to(device)[target]
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)[target]
        return cls(layer.to(device), image.to(device), query.to(device), labels, boxes)


def _paired_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of each pair (boxes1[i], boxes2[i]) in xyxy: the diagonal of torchvision's
    `generalized_box_iou(boxes1, boxes2)`, same arithmetic, without the N x N matrix."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / hull


def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Average number of target boxes per process, at least 1.

    Averaged over processes (all-reduce) so that every process divides by the same number and the
    averaged gradients weigh each box equally; clamped so that a batch without boxes divides by 1.
    """
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_boxes)
        num_boxes = num_boxes / torch.distributed.get_world_size()
    return torch.clamp(num_boxes, min=1).item()


def build_weight_dict(ce: float, bbox: float, giou: float, num_aux_layers: int) -> dict[str, float]:
    """Weights of the optimised losses: loss_ce, loss_bbox, loss_giou, and a `_i` copy for each aux layer i."""
    final = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    weights = dict(final)
    for i in range(num_aux_layers):
        weights.update({f"{key}_{i}": value for key, value in final.items()})
    return weights


def total_loss(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """Weighted sum of the losses named in `weight_dict`; the other entries (logged metrics) are ignored.

    A weighted loss missing from `losses` is an error, not a silent zero: it means the model and the
    criterion disagree, e.g. aux losses are weighted but the model returned no "aux_outputs".
    """
    missing = [key for key in weight_dict if key not in losses]
    if missing:
        raise KeyError(f"weighted losses missing from the criterion's output: {missing}")
    return sum(losses[key] * weight for key, weight in weight_dict.items())


def build_criterion(loss_cfg, num_classes: int, num_decoder_layers: int, aux_loss: bool) -> SetCriterion:
    """SetCriterion from a `LossConfig`; with `aux_loss`, the num_decoder_layers - 1 intermediate layers are weighted too."""
    num_aux_layers = num_decoder_layers - 1 if aux_loss else 0
    weight_dict = build_weight_dict(loss_cfg.ce_loss_coef, loss_cfg.bbox_loss_coef, loss_cfg.giou_loss_coef,
                                    num_aux_layers)
    return SetCriterion(num_classes, build_matcher(loss_cfg), weight_dict, eos_coef=loss_cfg.eos_coef)
