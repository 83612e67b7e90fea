"""DETR's Hungarian matcher: a one-to-one assignment of predictions to ground-truth objects.

The detector predicts a fixed set of `num_queries` boxes; the loss needs to know which prediction
answers which object. Following DETR (facebookresearch/detr, `models/matcher.py`), the cost of
pairing prediction i with object j is

    cost_class * (-p_i(label_j)) + cost_bbox * ||box_i - box_j||_1 + cost_giou * (-GIoU(box_i, box_j))

and `scipy.optimize.linear_sum_assignment` finds the pairing of least total cost. Predictions left
unmatched are trained towards the "no object" class by the criterion.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """Matches the predictions of each image to its targets; every target gets exactly one prediction."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0 "
                             "(every assignment would cost the same, so matching would be arbitrary)")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Pairwise matching cost, [num_preds, num_targets].

        pred_logits: [num_preds, num_classes + 1]; pred_boxes: [num_preds, 4] normalised cxcywh;
        tgt_labels: [num_targets] int64; tgt_boxes: [num_targets, 4] normalised cxcywh.
        Computed in float32 so that half-precision outputs give the same match and scipy can read it.
        The class term uses -probability rather than -log-probability, as DETR does: it is bounded
        and so commensurate with the box terms.
        """
        prob = pred_logits.float().softmax(-1)
        pred_boxes, tgt_boxes = pred_boxes.float(), tgt_boxes.float()
        cost_class = -prob[:, tgt_labels]
        cost_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"),
                                         box_convert(tgt_boxes, "cxcywh", "xyxy"))
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """One (pred_idx, tgt_idx) pair of int64 CPU tensors per image, each of length min(num_queries, num_targets).

        outputs["pred_logits"]: [batch_size, num_queries, num_classes + 1];
        outputs["pred_boxes"]: [batch_size, num_queries, 4] normalised cxcywh;
        targets[b]["labels"]: [num_targets_b] int64; targets[b]["boxes"]: [num_targets_b, 4] normalised cxcywh.
        pred_idx[k] is matched to tgt_idx[k]; pred_idx is sorted. An image without targets gets two
        empty tensors.
        """
        return self.match_layers(outputs["pred_logits"][None], outputs["pred_boxes"][None], targets)[0]

    @torch.no_grad()
    def match_layers(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[list[tuple[Tensor, Tensor]]]:
        """`forward` for every decoder layer at once: logits [layers, batch_size, num_queries,
        num_classes + 1], boxes [layers, batch_size, num_queries, 4] -> one list of pairs per layer.
        The costs of all layers and images are computed together (one transfer to the CPU); each
        image's block of columns is then assigned separately."""
        layers, batch_size, num_queries = logits.shape[:3]
        cost = self.cost_matrix(logits.flatten(0, 2), boxes.flatten(0, 2),
                                torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]))
        cost = cost.view(layers, batch_size, num_queries, -1).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        blocks = cost.split(sizes, -1)
        return [[_as_tensors(linear_sum_assignment(block[layer, b])) for b, block in enumerate(blocks)]
                for layer in range(layers)]


def _as_tensors(assignment) -> tuple[Tensor, Tensor]:
    rows, cols = assignment
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def build_matcher(loss_cfg) -> HungarianMatcher:
    """Matcher from a `LossConfig` (set_cost_class, set_cost_bbox, set_cost_giou)."""
    return HungarianMatcher(loss_cfg.set_cost_class, loss_cfg.set_cost_bbox, loss_cfg.set_cost_giou)
