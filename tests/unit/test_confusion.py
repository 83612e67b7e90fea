"""The confusion matrix: known answers for matches, confusions, duplicates, misses and crowds."""
import contextlib
import io

import numpy as np
from pycocotools.coco import COCO

from sparse_detr.metrics.confusion import confusion_matrix, match_image
import torch


def ground_truth() -> COCO:
    annotations = [
        (1, 1, [0, 0, 10, 10], 0), (1, 2, [20, 20, 10, 10], 0),
        (2, 4, [0, 0, 10, 10], 0), (2, 4, [30, 30, 10, 10], 0), (2, 1, [60, 60, 10, 10], 1),
    ]
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 4, "name": "d"}],
        "annotations": [{"id": i + 1, "image_id": image, "category_id": category, "bbox": box, "area": 100.0,
                         "iscrowd": crowd} for i, (image, category, box, crowd) in enumerate(annotations)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def rows(image_id, *detections):
    return np.array([[image_id, *box, score, category] for box, score, category in detections], dtype=np.float64)


def test_confusion_matrix_known_answer():
    detections = {
        1: rows(1, ([0, 0, 10, 10], 0.7, 1),     # a duplicate of the next one, lower score: background
                ([0, 0, 10, 10], 0.9, 1),        # a on a: correct
                ([20, 20, 10, 9], 0.8, 4),       # d on b (IoU 0.9): confusion
                ([50, 50, 5, 5], 0.3, 2)),       # under the score threshold: not counted
        2: rows(2, ([0, 0, 10, 4], 0.6, 4),      # IoU 0.4 with a d: background, and that d is missed
                ([60, 60, 10, 10], 0.9, 1)),     # on a crowd box: background
    }
    matrix = confusion_matrix(ground_truth(), detections, [1, 2, 4], score_threshold=0.5, iou_threshold=0.5)
    expected = [[1, 0, 0, 0],   # ground truth a
                [0, 0, 1, 0],   # ground truth b
                [0, 0, 0, 2],   # ground truth d: both missed
                [2, 0, 1, 0]]   # background: the duplicate a, the crowd a, the loose d
    np.testing.assert_array_equal(matrix, expected)


def test_an_image_without_detections_counts_all_its_boxes_as_missed():
    matrix = confusion_matrix(ground_truth(), {1: np.zeros((0, 7))}, [1, 2, 4], score_threshold=0.5)
    np.testing.assert_array_equal(matrix[:, 3], [1, 1, 0, 0])
    assert matrix.sum() == 2


def test_each_detection_takes_the_best_free_box():
    gt = torch.tensor([[0.0, 0, 10, 10], [2.0, 0, 10, 10]])
    detections = torch.tensor([[2.0, 0, 10, 10], [1.0, 0, 10, 10], [1.0, 0, 10, 10]])  # best first
    assert match_image(gt, detections, 0.5) == [1, 0, -1]
