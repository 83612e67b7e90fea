"""CocoEvaluator on a tiny COCO-format data set with sparse category ids and boxes of every size."""
import json
import math

import pytest
import torch

from sparse_detr.metrics.coco_eval import METRIC_NAMES, CocoEvaluator

CATEGORY_IDS = [3, 7, 12]  # label 0, 1, 2
SMALL, MEDIUM, LARGE = (10, 12), (50, 60), (200, 150)  # (w, h): area < 32^2, < 96^2, >= 96^2
# image id -> [(category id, x, y, (w, h))]: every category at every size, at most one per image,
# so that AR1 can also reach 1; image 4 holds no objects.
OBJECTS = {
    1: [(3, 10, 20, SMALL), (7, 100, 100, MEDIUM), (12, 300, 200, LARGE)],
    2: [(3, 400, 250, LARGE), (7, 30, 40, SMALL), (12, 200, 50, MEDIUM)],
    3: [(3, 250, 300, MEDIUM), (7, 20, 200, LARGE), (12, 500, 20, SMALL)],
    4: [],
}


@pytest.fixture(scope="module")
def annotation_file(tmp_path_factory):
    annotations = [
        {"id": k, "image_id": image_id, "category_id": c, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
        for k, (image_id, (c, x, y, (w, h))) in enumerate(
            ((i, obj) for i, objects in OBJECTS.items() for obj in objects), start=1
        )
    ]
    dataset = {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in OBJECTS],
        "categories": [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS],
        "annotations": annotations,
    }
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps(dataset))
    return path


def ground_truth_as_predictions(image_ids=OBJECTS):
    """Model-style outputs: contiguous labels, xyxy boxes in original pixels, score 1."""
    predictions = {}
    for image_id in image_ids:
        objects = OBJECTS[image_id]
        predictions[image_id] = {
            "scores": torch.ones(len(objects)),
            "labels": torch.tensor([CATEGORY_IDS.index(c) for c, *_ in objects], dtype=torch.int64),
            "boxes": torch.tensor([[x, y, x + w, y + h] for _, x, y, (w, h) in objects]).float().reshape(-1, 4),
        }
    return predictions


def test_ground_truth_as_detections_scores_one(annotation_file, capsys):
    evaluator = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    predictions = ground_truth_as_predictions()
    evaluator.update({i: predictions[i] for i in (1, 2)})  # two batches
    evaluator.update({i: predictions[i] for i in (3, 4)})
    metrics = evaluator.compute()
    assert list(metrics) == list(METRIC_NAMES)
    assert metrics == pytest.approx({name: 1.0 for name in METRIC_NAMES})
    assert capsys.readouterr().out == ""  # pycocotools kept quiet
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in evaluator.summary


def test_labels_are_mapped_to_category_ids(annotation_file):
    unmapped = CocoEvaluator(annotation_file)  # labels 0, 1, 2 taken as category ids: none exist
    unmapped.update(ground_truth_as_predictions())
    assert unmapped.compute()["AP"] == 0.0


def test_random_boxes_score_about_zero(annotation_file):
    generator = torch.Generator().manual_seed(0)
    evaluator = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    predictions = {}
    for image_id in OBJECTS:
        corner = torch.rand(100, 2, generator=generator) * torch.tensor([600.0, 440.0])
        size = torch.rand(100, 2, generator=generator) * 40 + 1
        predictions[image_id] = {
            "scores": torch.rand(100, generator=generator),
            "labels": torch.randint(0, 3, (100,), generator=generator),
            "boxes": torch.cat([corner, corner + size], dim=1),
        }
    evaluator.update(predictions)
    metrics = evaluator.compute()
    assert metrics["AP"] < 0.02 and metrics["AP50"] < 0.05


def test_no_detections_give_zeros(annotation_file):
    evaluator = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator.update({image_id: empty for image_id in OBJECTS})
    assert evaluator.compute() == {name: 0.0 for name in METRIC_NAMES}
    assert "Average Recall" in evaluator.summary


def test_only_updated_images_are_scored_and_missing_kinds_are_nan(annotation_file):
    evaluator = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    evaluator.update(ground_truth_as_predictions([4]))  # the image without objects
    assert all(math.isnan(value) for value in evaluator.compute().values())
    evaluator.update(ground_truth_as_predictions([1]))
    assert evaluator.compute()["AP"] == pytest.approx(1.0)


def shard_predictions(rank):
    """Rank 0: images 1, 2; rank 1: image 2 again (as a DistributedSampler pads) and image 3 missed."""
    predictions = ground_truth_as_predictions([1, 2])
    if rank == 0:
        return predictions
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    return {2: predictions[2], 3: empty}


def _distributed_worker(rank, world_size, init_file, annotation_file, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    evaluator = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    evaluator.update(shard_predictions(rank))
    evaluator.synchronize()
    if rank == 0:
        results.put(evaluator.compute())
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_synchronize_gathers_all_ranks(annotation_file, tmp_path):
    single = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    single.update(shard_predictions(0))
    single.update(shard_predictions(1))
    expected = single.compute()
    assert expected["AP"] < 0.9  # rank 0's own images alone would score 1
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, tmp_path / "init", annotation_file, results), nprocs=2, join=True
    )
    assert results.get() == pytest.approx(expected)


def test_per_class_ap_is_known_for_each_class_and_averages_to_ap(annotation_file):
    evaluator = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    predictions = ground_truth_as_predictions()
    for output in predictions.values():  # class3 found perfectly, class7 never, class12 boxes shifted off
        keep = output["labels"] != 1
        for key in output:
            output[key] = output[key][keep]
        output["boxes"][output["labels"] == 2] += 1000.0
    evaluator.update(predictions)
    metrics = evaluator.compute()
    assert evaluator.class_ap == pytest.approx({"AP_class/class3": 1.0, "AP_class/class7": 0.0,
                                                "AP_class/class12": 0.0})
    assert metrics["AP"] == pytest.approx(sum(evaluator.class_ap.values()) / 3)
    ranked = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    generator = torch.Generator().manual_seed(1)
    noisy = ground_truth_as_predictions()
    for output in noisy.values():   # jittered boxes: every class between 0 and 1
        output["boxes"] += torch.randn(output["boxes"].shape, generator=generator) * 6
    ranked.update(noisy)
    ap = ranked.compute()["AP"]
    assert 0 < ap < 1 and ap == pytest.approx(sum(ranked.class_ap.values()) / 3)


def test_a_class_without_ground_truth_on_the_scored_images_has_nan_ap(annotation_file):
    evaluator = CocoEvaluator(annotation_file, label_to_category=CATEGORY_IDS)
    evaluator.update(ground_truth_as_predictions([4]))
    evaluator.compute()
    assert set(evaluator.class_ap) == {"AP_class/class3", "AP_class/class7", "AP_class/class12"}
    assert all(math.isnan(v) for v in evaluator.class_ap.values())
