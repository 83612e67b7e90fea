"""One training epoch and one evaluation pass, as DETR's engine, plus what they log."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from sparse_detr.engine.progress import Progress
from sparse_detr.errors import UserError
from sparse_detr.matching.criterion import total_loss
from sparse_detr.metrics.coco_eval import CocoEvaluator
from sparse_detr.metrics.paibb_sizes import PaibbBySize, matched_pairs
from sparse_detr.metrics.sparsity import SparsityAccumulator, site_layout
from sparse_detr.models.sparse_solver import check_uncertified
from sparse_detr.tracking import TRAIN, TRAIN_EXTRA, TRAIN_MAIN, learned_key

# Logged as the main series: DETR's weighted losses and its two error rates.
MAIN_TERMS = ("loss_ce", "loss_bbox", "loss_giou")
ERROR_TERMS = ("class_error", "cardinality_error")


class NonFiniteLoss(UserError, FloatingPointError):
    """The loss (or the model's output) became NaN or infinite; the run stops before the step is
    applied, keeping the last good checkpoint. A diverging run, not a bug: one line, no traceback."""


@dataclass
class TrainState:
    epoch: int = 0            # the epoch being run (or to run next)
    batch_in_epoch: int = 0   # batches of `epoch` already trained on
    global_step: int = 0      # optimizer steps since the start of the run, across resumes
    # Sums of the main terms over the epoch's batches so far: saved with the rest, so an epoch's
    # means after a resume (or a stop at its very end) are the uninterrupted run's.
    epoch_sums: dict[str, float] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def autocast(device: torch.device, amp: str):
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(images, mask, targets, device):
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / dist.get_world_size()).tolist()))


def learned_mapping_values(model: nn.Module) -> dict[str, float]:
    """`<name>/<site>/layer_<l>/head_<h>` for every per-head value a mapping learns (`alpha`,
    `lambda`: whatever its kind declares in `learned_values`)."""
    values = {}
    for site, layer, attention in unwrap(model).transformer.site_attention():
        for name, per_head in attention.mapping.learned_values().items():
            for head, value in enumerate(per_head.detach().cpu().tolist()):
                values[learned_key(name, site, layer, head)] = value
    return values


def training_metrics(losses: dict[str, torch.Tensor], weight_dict: dict[str, float], loss: float) -> dict[str, float]:
    """Weighted main terms, unscaled and per-layer terms, under the tracker's group names."""
    values = {name: float(value.detach()) for name, value in losses.items()}
    metrics = {f"{TRAIN_MAIN}/loss": loss}
    for name, value in values.items():
        metrics[f"{TRAIN}/{name}_unscaled"] = value
        if name in weight_dict:
            metrics[f"{TRAIN}/{name}"] = value * weight_dict[name]
    for name in MAIN_TERMS:
        metrics[f"{TRAIN_MAIN}/{name}"] = values[name] * weight_dict[name]
    for name in ERROR_TERMS:
        if name in values:
            metrics[f"{TRAIN_MAIN}/{name}"] = values[name]
    return metrics


def non_finite_outputs(outputs: dict, prefix: str = "") -> list[str]:
    """Names of the model's output tensors holding NaN or inf (aux outputs as `aux_outputs[i].pred_boxes`)."""
    names = []
    for key, value in outputs.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            names.append(prefix + key)
        elif key == "aux_outputs":
            for index, aux in enumerate(value):
                names += non_finite_outputs(aux, f"{prefix}{key}[{index}].")
    return names


def check_outputs_finite(outputs: dict, criterion, step: int) -> None:
    """Before matching: the matcher cannot assign on NaN costs, and no loss term is defined."""
    bad = non_finite_outputs(outputs)
    if bad:
        terms = ", ".join(f"{name}=nan" for name in criterion.weight_dict)
        raise NonFiniteLoss(f"the model's outputs are not finite at global step {step} ({', '.join(bad[:4])}"
                            f"{', ...' if len(bad) > 4 else ''}), so every loss term is undefined: {terms}. "
                            f"The step was not applied; the run folder keeps its last checkpoint")


def train_one_epoch(model, criterion, loader, optimizer, state: TrainState, *, device, loop_cfg, clip_max_norm,
                    tracker, on_step=None, scaler=None) -> dict[str, float]:
    """Train until the loader is exhausted or `max_steps` is reached; returns epoch means of the main terms.

    on_step(state) runs after every optimizer step (the trainer checkpoints there)."""
    model.train()
    criterion.train()
    sums = state.epoch_sums
    progress = Progress(len(loader), f"epoch {state.epoch}", loop_cfg.progress)
    tick = time.perf_counter()
    for images, mask, targets in loader:
        data_time = time.perf_counter() - tick
        images, mask, targets = to_device(images, mask, targets, device)
        with autocast(device, loop_cfg.amp):
            outputs = model(images, mask)
        outputs = _float(outputs)
        check_outputs_finite(outputs, criterion, state.global_step + 1)
        losses = criterion(outputs, targets)
        loss = total_loss(losses, criterion.weight_dict)
        loss_value = loss.item()
        if device.type == "cuda":
            check_uncertified()  # the sparse mappings' exactness, read once per step
        if not math.isfinite(loss_value):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise NonFiniteLoss(f"loss is {loss_value} at global step {state.global_step + 1}: {terms}. "
                                f"The step was not applied; the run folder keeps its last checkpoint")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state.global_step += 1
        state.batch_in_epoch += 1

        metrics = training_metrics(losses, criterion.weight_dict, loss_value)
        for key in (f"{TRAIN_MAIN}/loss", *(f"{TRAIN_MAIN}/{n}" for n in MAIN_TERMS + ERROR_TERMS)):
            if key in metrics:
                sums[key] = sums.get(key, 0.0) + metrics[key]
        iteration_time = time.perf_counter() - tick
        if state.global_step % loop_cfg.log_every == 0:
            metrics = mean_across_ranks(metrics)
            metrics.update({f"{TRAIN_EXTRA}/lr_{g['name']}": g["lr"] for g in optimizer.param_groups})
            metrics[f"{TRAIN_EXTRA}/iteration_time"] = iteration_time
            metrics[f"{TRAIN_EXTRA}/data_time"] = data_time
            if device.type == "cuda":
                metrics[f"{TRAIN_EXTRA}/memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics.update(learned_mapping_values(model))
            tracker.log(metrics, step=state.global_step)
        progress.update(loss=loss_value)
        if on_step is not None:
            on_step(state)
        if loop_cfg.max_steps is not None and state.global_step >= loop_cfg.max_steps:
            break
        tick = time.perf_counter()
    progress.close()
    steps = max(1, state.batch_in_epoch)
    return mean_across_ranks({key: value / steps for key, value in sums.items()})


def _float(outputs: dict) -> dict:
    """Losses are computed in float32, outside autocast, as DETR does."""
    def cast(value):
        if torch.is_tensor(value):
            return value.float()
        if isinstance(value, list):
            return [cast(v) for v in value]
        if isinstance(value, dict):
            return {k: cast(v) for k, v in value.items()}
        return value

    return cast(outputs)


@torch.no_grad()
def evaluate(model, postprocessor, loader, evaluator: CocoEvaluator, *, device, loop_cfg,
             sparsity: SparsityAccumulator | None = None, paibb: PaibbBySize | None = None,
             criterion=None) -> dict[str, float]:
    """COCO metrics over the loader, then per-class AP (`AP_class/<name>`); rank 0 gets them, others
    an empty dict. Attention sparsity per site and layer goes into `sparsity` when given, and the
    PAIBB of every decoder layer by object size into `paibb` (the queries matched by `criterion`)."""
    model.eval()
    progress = Progress(len(loader), "eval", loop_cfg.progress)
    for images, mask, targets in loader:
        images, mask, targets = to_device(images, mask, targets, device)
        with autocast(device, loop_cfg.amp):
            outputs = model(images, mask, return_attention=sparsity is not None or paibb is not None)
        sizes = torch.stack([t["orig_size"] for t in targets])
        predictions = _float({key: outputs[key] for key in ("pred_logits", "pred_boxes")})
        results = postprocessor(predictions, sizes)
        evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})
        if sparsity is not None:
            for site, layers in outputs["attention"].items():
                for layer, weights in enumerate(layers):
                    sparsity.update(site, layer, weights.float(), *site_layout(site, outputs["feature_mask"]))
        if paibb is not None:
            matches = matched_pairs(criterion, predictions, targets)
            for layer, weights in enumerate(outputs["attention"]["cross"]):
                paibb.update(layer, weights, outputs["feature_mask"], matches, sizes)
        progress.update()
    progress.close()
    evaluator.synchronize()
    for accumulator in (sparsity, paibb):
        if accumulator is not None:
            accumulator.synchronize()
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return {**evaluator.compute(), **evaluator.class_ap}
