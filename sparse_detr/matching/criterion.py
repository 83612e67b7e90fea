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

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

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

    def loss_labels(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices,
                    num_boxes: float, log: bool = True) -> dict[str, Tensor]:
        """`loss_ce` over [batch_size, num_queries] class targets; with `log`, also `class_error`.

        `class_error` is the top-1 error in percent on matched queries; with no matched query it
        is 100, as in DETR, so logs stay comparable with DETR's.
        """
        logits = outputs["pred_logits"]  # [batch_size, num_queries, num_classes + 1]
        idx = _matched_queries(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[idx] = matched_labels
        losses = {"loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)}
        if log:
            with torch.no_grad():
                correct = (logits[idx].argmax(-1) == matched_labels).float()
                accuracy = correct.mean() * 100 if correct.numel() else correct.new_zeros(())
                losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices,
                         num_boxes: float) -> dict[str, Tensor]:
        """`cardinality_error`: mean absolute difference between the number of queries whose arg-max is
        not "no object" and the number of targets, per image."""
        logits = outputs["pred_logits"]
        predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        actual = torch.as_tensor([len(t["labels"]) for t in targets], dtype=torch.float, device=logits.device)
        return {"cardinality_error": F.l1_loss(predicted, actual)}

    def loss_boxes(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices,
                   num_boxes: float) -> dict[str, Tensor]:
        """`loss_bbox` (L1 on normalised cxcywh) and `loss_giou` (1 - GIoU), summed over matched pairs / num_boxes."""
        pred = outputs["pred_boxes"][_matched_queries(indices)]  # [num_matched, 4]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred.dtype)
        giou = torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
        return {"loss_bbox": F.l1_loss(pred, tgt, reduction="sum") / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def get_loss(self, name: str, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], indices: Indices,
                 num_boxes: float, **kwargs) -> dict[str, Tensor]:
        loss_fn = {"labels": self.loss_labels, "boxes": self.loss_boxes, "cardinality": self.loss_cardinality}[name]
        return loss_fn(outputs, targets, indices, num_boxes, **kwargs)

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]], return_indices: bool = False):
        """Unweighted losses, or (losses, indices) with `return_indices`.

        outputs: "pred_logits" [batch_size, num_queries, num_classes + 1], "pred_boxes"
        [batch_size, num_queries, 4] normalised cxcywh, optionally "aux_outputs": a list of dicts
        with the same two keys, one per intermediate decoder layer.
        targets: per image, "labels" [num_targets] int64 and "boxes" [num_targets, 4] normalised cxcywh,
        on the outputs' device.
        indices: the final layer's match, one (pred_idx, tgt_idx) pair of int64 CPU tensors per image.
        """
        indices = self.matcher(outputs, targets)
        num_boxes = _num_boxes(targets, outputs["pred_logits"].device)
        losses = {}
        for name in self.losses:
            losses.update(self.get_loss(name, outputs, targets, indices, num_boxes))
        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            aux_indices = self.matcher(aux, targets)
            for name in self.losses:
                kwargs = {"log": False} if name == "labels" else {}
                aux_losses = self.get_loss(name, aux, targets, aux_indices, num_boxes, **kwargs)
                losses.update({f"{key}_{i}": value for key, value in aux_losses.items()})
        return (losses, indices) if return_indices else losses


def _matched_queries(indices: Indices) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx) that index [batch_size, num_queries, ...] tensors at the matched queries."""
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


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
