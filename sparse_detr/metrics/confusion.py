"""Which classes a detector confuses: a confusion matrix of detections matched to ground truth.

Per image, detections with score >= `score_threshold` are taken best first; each is matched to
the not yet matched ground-truth box (any class) with the highest IoU, if that IoU is at least
`iou_threshold`. A matched pair counts in (its ground-truth class, its predicted class); a
ground-truth box left unmatched counts in (its class, background), a detection left unmatched in
(background, its class). Crowd boxes are left out, as training leaves them out.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_convert, box_iou


def match_image(gt_boxes: torch.Tensor, det_boxes: torch.Tensor, iou_threshold: float) -> list[int]:
    """Boxes [G, 4] and [D, 4] xywh, detections best first -> per detection its ground-truth index or -1."""
    if not len(gt_boxes) or not len(det_boxes):
        return [-1] * len(det_boxes)
    iou = box_iou(box_convert(det_boxes, "xywh", "xyxy"), box_convert(gt_boxes, "xywh", "xyxy"))
    taken = torch.zeros(len(gt_boxes), dtype=torch.bool)
    matches = []
    for row in iou:
        row = row.masked_fill(taken, -1.0)
        best = int(row.argmax())
        if row[best] >= iou_threshold:
            taken[best] = True
            matches.append(best)
        else:
            matches.append(-1)
    return matches


def confusion_matrix(coco_gt: COCO, detections: Mapping[int, np.ndarray], category_ids: Sequence[int], *,
                     score_threshold: float, iou_threshold: float = 0.5) -> np.ndarray:
    """[C + 1, C + 1] counts: rows are ground-truth classes, columns predicted classes, in the order
    of `category_ids`, the last row and column background.

    detections: image id -> [N, 7] rows (image_id, x, y, w, h, score, category_id), as
    `CocoEvaluator.detections()` gives them; only these images are counted.
    """
    index = {int(c): i for i, c in enumerate(category_ids)}
    background = len(category_ids)
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    for image_id, rows in detections.items():
        rows = rows[rows[:, 5] >= score_threshold]
        rows = rows[np.argsort(-rows[:, 5], kind="stable")]
        truth = [a for a in coco_gt.imgToAnns.get(int(image_id), []) if not a.get("iscrowd", 0)]
        gt_boxes = torch.tensor([a["bbox"] for a in truth], dtype=torch.float64).reshape(-1, 4)
        matches = match_image(gt_boxes, torch.from_numpy(rows[:, 1:5]), iou_threshold)
        for predicted, gt in zip(rows[:, 6].astype(int), matches):
            matrix[background if gt < 0 else index[truth[gt]["category_id"]], index[int(predicted)]] += 1
        for gt, annotation in enumerate(truth):
            if gt not in matches:
                matrix[index[annotation["category_id"]], background] += 1
    return matrix
