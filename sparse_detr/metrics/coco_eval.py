"""COCO box AP/AR for DETR outputs: a quiet, distributed-aware wrapper around pycocotools.

pycocotools does all matching and averaging, so the numbers are the ones published DETR results
use. This module only converts post-processed outputs into COCO results, gathers them across
ranks, keeps pycocotools' printing out of the logs, and covers the case where it would crash
(no detections at all).

Convention: pycocotools reports -1 where the evaluated images hold no ground truth of a kind
(e.g. no small objects). Such a metric is NaN here, so it can never be averaged in as a score,
and `null` in the JSON file.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sparse_detr.metrics.names import CLASS_AP, METRIC_NAMES



class CocoEvaluator:
    """Accumulate detections batch by batch, then score them with COCOeval (iouType bbox).

    Only the images passed to `update` are scored, so a run on a subset is scored on that subset;
    an image passed with no detections still counts (its ground truth are misses).
    `label_to_category[label]` is the data set's category id of a contiguous model label
    (None: labels are the category ids).
    """

    def __init__(
        self,
        coco_gt: COCO | str | os.PathLike,
        label_to_category: list[int] | None = None,
        verbose: bool = False,
    ):
        if not isinstance(coco_gt, COCO):
            with contextlib.redirect_stdout(io.StringIO()):
                coco_gt = COCO(os.fspath(coco_gt))
        self.coco_gt = coco_gt
        self.label_to_category = None if label_to_category is None else torch.as_tensor(label_to_category)
        self.verbose = verbose
        self.summary = ""  # pycocotools' summary table of the last compute()
        self.class_ap: dict[str, float] = {}  # "AP_class/<category name>" -> AP of the last compute()
        self._detections: dict[int, np.ndarray] = {}

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """predictions: image_id -> {"scores": [Q], "labels": [Q] int64, "boxes": [Q, 4] xyxy, original pixels}.

        Each image is kept as a [Q, 7] float64 array (image_id, x, y, w, h, score, category_id):
        the layout pycocotools' loadRes reads, and compact to gather across ranks. A repeated
        image id replaces the earlier entry, since a DistributedSampler pads with repeats.
        """
        for image_id, output in predictions.items():
            labels = output["labels"].detach().cpu().long()
            categories = labels if self.label_to_category is None else self.label_to_category[labels]
            boxes = output["boxes"].detach().cpu().double().reshape(-1, 4)
            rows = torch.cat(
                [
                    torch.full((len(labels), 1), float(image_id), dtype=torch.float64),
                    boxes[:, :2],
                    boxes[:, 2:] - boxes[:, :2],
                    output["scores"].detach().cpu().double()[:, None],
                    categories.double()[:, None],
                ],
                dim=1,
            )
            self._detections[int(image_id)] = rows.numpy()

    def synchronize(self) -> None:
        """Give every rank the detections of all ranks (a collective: call it on every rank).

        Afterwards rank 0 alone can call compute(). A no-op without an initialised process group.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[dict[int, np.ndarray] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._detections)
        merged: dict[int, np.ndarray] = {}
        for part in gathered:
            merged.update(part)
        self._detections = merged

    def detections(self) -> dict[int, np.ndarray]:
        """image id -> its [Q, 7] rows (image_id, x, y, w, h, score, category_id) of every image seen."""
        return dict(self._detections)

    def compute(self) -> dict[str, float]:
        """Score the images seen so far -> {"AP", "AP50", ..., "ARl"} (floats, NaN where pycocotools says -1).

        pycocotools' printing is captured into `self.summary` (and printed as well if verbose).
        """
        image_ids = sorted(self._detections)
        rows = np.concatenate([self._detections[i] for i in image_ids]) if image_ids else np.zeros((0, 7))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            coco_eval = COCOeval(self.coco_gt, self._load_results(rows), iouType="bbox")
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            summary_start = printed.tell()
            coco_eval.summarize()
        self.summary = printed.getvalue()[summary_start:]
        self.class_ap = self._class_ap(coco_eval)
        if self.verbose:
            print(printed.getvalue(), end="")
        return {name: math.nan if value == -1 else float(value) for name, value in zip(METRIC_NAMES, coco_eval.stats)}

    def _class_ap(self, coco_eval: COCOeval) -> dict[str, float]:
        """AP@[.5:.95] of each category (all areas, 100 detections), as COCOeval's AP averages it:
        the mean over IoU thresholds and recall points of the precisions it defines; NaN for a
        category without ground truth on the scored images. Over categories these average to AP."""
        precision = coco_eval.eval["precision"]          # [IoU, recall, category, area, max dets]
        area_all, max_dets_100 = 0, len(coco_eval.params.maxDets) - 1
        out = {}
        for k, category in enumerate(coco_eval.params.catIds):
            values = precision[:, :, k, area_all, max_dets_100]
            values = values[values > -1]
            out[f"{CLASS_AP}/{self.coco_gt.cats[category]['name']}"] = float(values.mean()) if values.size else math.nan
        return out

    def _load_results(self, rows: np.ndarray) -> COCO:
        """[N, 7] result rows -> a COCO results object (loadRes itself fails when N = 0)."""
        if len(rows):
            return self.coco_gt.loadRes(rows)
        empty = COCO()
        empty.dataset = {
            "images": list(self.coco_gt.dataset["images"]),
            "categories": list(self.coco_gt.dataset["categories"]),
            "annotations": [],
        }
        empty.createIndex()
        return empty

