"""Known-answer tests of the Hungarian matcher and DETR's set criterion."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from sparse_detr.config import LossConfig
from sparse_detr.matching.criterion import SetCriterion, build_criterion, build_weight_dict, total_loss
from sparse_detr.matching.matcher import HungarianMatcher

NUM_CLASSES = 3  # logits have NUM_CLASSES + 1 entries; the last one is "no object"


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] valid normalised cxcywh boxes."""
    centre = 0.25 + 0.5 * torch.rand(n, 2, generator=generator)
    size = 0.05 + 0.4 * torch.rand(n, 2, generator=generator)
    return torch.cat([centre, size], dim=1)


def confident_logits(labels: list[int], num_queries: int) -> torch.Tensor:
    """[num_queries, NUM_CLASSES + 1]: query i says labels[i] with near certainty, the rest say "no object"."""
    logits = torch.zeros(num_queries, NUM_CLASSES + 1)
    classes = labels + [NUM_CLASSES] * (num_queries - len(labels))
    logits[torch.arange(num_queries), classes] = 20.0
    return logits


def perfect_batch(sizes: list[int], num_queries: int = 6, seed: int = 0):
    """Outputs whose first N_b queries predict image b's N_b targets exactly; the others say "no object"."""
    generator = torch.Generator().manual_seed(seed)
    targets, logits, boxes = [], [], []
    for n in sizes:
        labels = torch.randint(NUM_CLASSES, (n,), generator=generator)
        target_boxes = random_boxes(n, generator)
        targets.append({"labels": labels, "boxes": target_boxes})
        logits.append(confident_logits(labels.tolist(), num_queries))
        boxes.append(torch.cat([target_boxes, random_boxes(num_queries - n, generator)]))
    return {"pred_logits": torch.stack(logits), "pred_boxes": torch.stack(boxes)}, targets


def criterion(eos_coef: float = 0.1, num_aux_layers: int = 0) -> SetCriterion:
    return SetCriterion(NUM_CLASSES, HungarianMatcher(), build_weight_dict(1, 5, 2, num_aux_layers), eos_coef=eos_coef)


def test_perfect_predictions_match_identity_with_zero_box_losses():
    outputs, targets = perfect_batch([3, 2])
    losses, indices = criterion()(outputs, targets, return_indices=True)
    for (pred_idx, tgt_idx), n in zip(indices, [3, 2]):
        assert pred_idx.dtype == tgt_idx.dtype == torch.int64
        assert pred_idx.tolist() == tgt_idx.tolist() == list(range(n))
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_ce"].item() == pytest.approx(0, abs=1e-6)
    assert losses["class_error"].item() == 0
    assert losses["cardinality_error"].item() == 0


def test_permuted_predictions_are_matched_to_the_permutation():
    outputs, targets = perfect_batch([4], num_queries=4)
    perm = torch.tensor([2, 0, 3, 1])  # query i predicts target perm[i]
    outputs = {key: value[:, perm] for key, value in outputs.items()}
    [(pred_idx, tgt_idx)] = HungarianMatcher()(outputs, targets)
    assert pred_idx.tolist() == [0, 1, 2, 3]
    assert tgt_idx.tolist() == perm.tolist()


def test_matcher_cost_known_answer():
    """One prediction, one target: -p(label) + 5 * L1 - 2 * GIoU, with GIoU worked out by hand."""
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    pred = torch.tensor([[0.1, 0.1, 0.2, 0.2]])    # xyxy [0, 0, .2, .2]
    target = torch.tensor([[0.2, 0.2, 0.2, 0.2]])  # xyxy [.1, .1, .3, .3]
    # intersection .01, union .07, enclosing box .09: GIoU = 1/7 - .02/.09
    giou = 1 / 7 - 0.02 / 0.09
    expected = -0.2 + 5 * 0.2 - 2 * giou
    cost = HungarianMatcher(1, 5, 2).cost_matrix(logits, pred, torch.tensor([1]), target)
    assert cost.item() == pytest.approx(expected, abs=1e-6)


def test_matcher_finds_the_brute_force_minimum():
    generator = torch.Generator().manual_seed(1)
    num_queries, sizes = 5, [3, 5, 1]
    outputs = {"pred_logits": torch.randn(len(sizes), num_queries, NUM_CLASSES + 1, generator=generator),
               "pred_boxes": torch.stack([random_boxes(num_queries, generator) for _ in sizes])}
    targets = [{"labels": torch.randint(NUM_CLASSES, (n,), generator=generator), "boxes": random_boxes(n, generator)}
               for n in sizes]
    matcher = HungarianMatcher()
    for b, ((pred_idx, tgt_idx), target) in enumerate(zip(matcher(outputs, targets), targets)):
        cost = matcher.cost_matrix(outputs["pred_logits"][b], outputs["pred_boxes"][b], target["labels"], target["boxes"])
        n = len(target["labels"])
        brute = min(cost[list(queries), range(n)].sum().item()
                    for queries in itertools.permutations(range(num_queries), n))
        assert sorted(tgt_idx.tolist()) == list(range(n))
        assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(brute, abs=1e-5)


def test_matcher_gives_the_same_match_for_bfloat16_outputs():
    outputs, targets = perfect_batch([3, 4], num_queries=6, seed=3)
    outputs["pred_boxes"] = outputs["pred_boxes"] + 0.01 * torch.randn_like(outputs["pred_boxes"])
    half = {key: value.bfloat16() for key, value in outputs.items()}
    for full, reduced in zip(HungarianMatcher()(outputs, targets), HungarianMatcher()(half, targets)):
        assert full[0].tolist() == reduced[0].tolist() and full[1].tolist() == reduced[1].tolist()


def test_matcher_rejects_all_zero_costs():
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0)


@pytest.mark.parametrize("sizes", [[0, 2], [0, 0]], ids=["one-empty-image", "empty-batch"])
def test_empty_targets(sizes):
    outputs, targets = perfect_batch(sizes, num_queries=4)
    logits = torch.zeros_like(outputs["pred_logits"], requires_grad=True)
    boxes = outputs["pred_boxes"].clone().requires_grad_()
    losses, indices = criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets, return_indices=True)
    assert indices[0][0].numel() == indices[0][1].numel() == 0
    if sum(sizes) == 0:
        assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
        # uniform logits, every query targets "no object" with the same weight: the mean is log(num_classes + 1)
        assert losses["loss_ce"].item() == pytest.approx(math.log(NUM_CLASSES + 1))
        assert losses["class_error"].item() == 100  # DETR's convention when nothing is matched
    losses["loss_ce"].backward()
    # gradient descent raises the "no object" logit of every query of the empty image
    assert (logits.grad[0, :, -1] < 0).all()
    assert torch.isfinite(logits.grad).all()


def test_cross_entropy_weights_no_object_by_eos_coef():
    """One image, 3 queries, one target of class 1 matched to query 0 (its box is exact)."""
    eos_coef = 0.25
    logits = torch.tensor([[[2.0, 1.0, 0.0, 0.5], [0.0, 0.3, 1.0, 1.5], [1.0, 0.0, -1.0, 0.2]]])
    target_box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05], [0.9, 0.9, 0.05, 0.05]]])
    targets = [{"labels": torch.tensor([1]), "boxes": target_box}]
    losses = criterion(eos_coef)({"pred_logits": logits, "pred_boxes": boxes}, targets)

    def nll(row, cls):
        row = row.tolist()
        return math.log(sum(math.exp(x) for x in row)) - row[cls]

    no_object = NUM_CLASSES
    weighted = 1.0 * nll(logits[0, 0], 1) + eos_coef * (nll(logits[0, 1], no_object) + nll(logits[0, 2], no_object))
    expected = weighted / (1.0 + 2 * eos_coef)
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-6)


def test_cardinality_error_known_answer():
    """Image 0: 2 targets, 3 queries predict an object -> 1. Image 1: 1 target, 1 predicted -> 0. Mean 0.5."""
    logits = torch.stack([confident_logits([0, 1, 2], 5), confident_logits([2], 5)])
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((2, 5, 4), 0.3)}
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.full((2, 4), 0.3)},
               {"labels": torch.tensor([2]), "boxes": torch.full((1, 4), 0.3)}]
    assert criterion()(outputs, targets)["cardinality_error"].item() == 0.5


def test_class_error_known_answer():
    """4 matched queries, boxes exact so the match is the identity; one predicts the wrong class -> 25%."""
    outputs, targets = perfect_batch([4], num_queries=6, seed=2)
    wrong = (targets[0]["labels"][3].item() + 1) % NUM_CLASSES
    outputs["pred_logits"][0, 3] = confident_logits([wrong], 1)[0]
    assert criterion()(outputs, targets)["class_error"].item() == pytest.approx(25.0)


def test_aux_losses_are_suffixed_and_equal_the_final_ones_for_identical_outputs():
    generator = torch.Generator().manual_seed(4)
    outputs = {"pred_logits": torch.randn(2, 5, NUM_CLASSES + 1, generator=generator),
               "pred_boxes": torch.stack([random_boxes(5, generator) for _ in range(2)])}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": random_boxes(2, generator)},
               {"labels": torch.tensor([1]), "boxes": random_boxes(1, generator)}]
    outputs["aux_outputs"] = [dict(outputs), dict(outputs)]
    losses = criterion(num_aux_layers=2)(outputs, targets)
    final = ["loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"]
    aux = [f"{key}_{i}" for i in range(2) for key in final if key != "class_error"]
    assert sorted(losses) == sorted(final + aux)
    for key in aux:
        assert losses[key].item() == pytest.approx(losses[key[:-2]].item())
    weights = build_weight_dict(1, 5, 2, num_aux_layers=2)
    single = losses["loss_ce"] + 5 * losses["loss_bbox"] + 2 * losses["loss_giou"]
    assert total_loss(losses, weights).item() == pytest.approx(3 * single.item())


def test_gradients_reach_logits_and_boxes():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, NUM_CLASSES + 1, generator=generator, requires_grad=True)
    boxes = torch.stack([random_boxes(4, generator) for _ in range(2)]).requires_grad_()
    targets = [{"labels": torch.tensor([1, 0]), "boxes": random_boxes(2, generator)},
               {"labels": torch.tensor([2]), "boxes": random_boxes(1, generator)}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}]}
    crit = criterion(num_aux_layers=1)
    total_loss(crit(outputs, targets), crit.weight_dict).backward()
    for grad in (logits.grad, boxes.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_total_loss_rejects_missing_weighted_losses():
    outputs, targets = perfect_batch([1])
    losses = criterion()(outputs, targets)  # no aux outputs
    with pytest.raises(KeyError, match="loss_ce_0"):
        total_loss(losses, build_weight_dict(1, 5, 2, num_aux_layers=1))


def test_build_criterion_from_loss_config():
    cfg = LossConfig(set_cost_class=2.0, ce_loss_coef=1.5, bbox_loss_coef=4.0, giou_loss_coef=3.0, eos_coef=0.2)
    crit = build_criterion(cfg, num_classes=NUM_CLASSES, num_decoder_layers=6, aux_loss=True)
    assert crit.matcher.cost_class == 2.0 and crit.matcher.cost_bbox == 5.0
    assert crit.empty_weight.tolist() == pytest.approx([1, 1, 1, 0.2])
    assert len(crit.weight_dict) == 3 * 6
    assert crit.weight_dict["loss_ce_4"] == 1.5 and crit.weight_dict["loss_giou_0"] == 3.0
    assert "loss_ce_5" not in crit.weight_dict
    no_aux = build_criterion(cfg, num_classes=NUM_CLASSES, num_decoder_layers=6, aux_loss=False)
    assert no_aux.weight_dict == {"loss_ce": 1.5, "loss_bbox": 4.0, "loss_giou": 3.0}


def test_unknown_loss_name_lists_the_choices():
    with pytest.raises(ValueError, match="labels, boxes, cardinality"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), {}, losses=("labels", "masks"))


def _distributed_loss_bbox(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    n = [1, 3][rank]
    target_boxes = torch.full((n, 4), 0.3)
    outputs = {"pred_logits": confident_logits([0] * n, 4).unsqueeze(0),
               "pred_boxes": torch.cat([target_boxes + 0.01, torch.full((4 - n, 4), 0.8)]).unsqueeze(0)}
    losses = criterion()(outputs, [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": target_boxes}])
    torch.save(losses["loss_bbox"], f"{result_dir}/{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_box_losses_divide_by_the_average_number_of_boxes_over_processes(tmp_path):
    """Ranks hold 1 and 3 boxes, each off by 0.01 per coordinate: both divide by (1 + 3) / 2 = 2."""
    torch.multiprocessing.spawn(_distributed_loss_bbox, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "0.pt").item() == pytest.approx(1 * 0.04 / 2)
    assert torch.load(tmp_path / "1.pt").item() == pytest.approx(3 * 0.04 / 2)


def detr_losses_of_one_layer(outputs, targets, indices, num_boxes, empty_weight):
    """DETR's SetCriterion (facebookresearch/detr models/detr.py) for one decoder layer, written
    out plainly: the reference the layer-batched criterion must equal."""
    import torch.nn.functional as F
    from torchvision.ops import box_convert, generalized_box_iou

    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    classes = torch.full(logits.shape[:2], NUM_CLASSES, dtype=torch.int64)
    classes[batch_idx, src_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
    pred = boxes[batch_idx, src_idx]
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
    giou = torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
    predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
    actual = torch.tensor([float(len(t["labels"])) for t in targets])
    return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, empty_weight),
            "loss_bbox": F.l1_loss(pred, tgt, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
            "cardinality_error": F.l1_loss(predicted, actual)}


def test_all_layers_at_once_equal_detr_layer_by_layer_with_gradients():
    generator = torch.Generator().manual_seed(11)
    layers = [{"pred_logits": torch.randn(3, 7, NUM_CLASSES + 1, generator=generator, dtype=torch.float64).requires_grad_(),
               "pred_boxes": torch.stack([random_boxes(7, generator) for _ in range(3)]).double().requires_grad_()}
              for _ in range(4)]
    targets = [{"labels": torch.tensor([0, 2, 2]), "boxes": random_boxes(3, generator).double()},
               {"labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)},
               {"labels": torch.tensor([1]), "boxes": random_boxes(1, generator).double()}]
    crit = criterion(eos_coef=0.2, num_aux_layers=3).double()
    losses, final_indices = crit({**layers[-1], "aux_outputs": layers[:-1]}, targets, return_indices=True)
    matcher = HungarianMatcher()
    expected, num_boxes = {}, 4.0
    for i, layer in enumerate([layers[-1], *layers[:-1]]):
        indices = matcher(layer, targets)
        if i == 0:
            assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(indices, final_indices))
        suffix = "" if i == 0 else f"_{i - 1}"
        expected.update({key + suffix: value for key, value in
                         detr_losses_of_one_layer(layer, targets, indices, num_boxes, crit.empty_weight).items()})
    assert set(losses) == set(expected) | {"class_error"}
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value, atol=1e-12, rtol=1e-12, msg=key)
    grads = torch.autograd.grad(total_loss(losses, crit.weight_dict), [t for layer in layers for t in layer.values()])
    expected_grads = torch.autograd.grad(total_loss(expected, crit.weight_dict), [t for layer in layers for t in layer.values()])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
