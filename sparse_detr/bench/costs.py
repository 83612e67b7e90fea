"""What a configured DETR costs: parameters, FLOPs of one forward, throughput, peak memory.

- parameters: total, trainable (a frozen backbone stem and layer1 are not), and learned alphas;
- GFLOPs: `torch.utils.flop_counter.FlopCounterMode` over one inference forward of the batch
  (it counts matrix products and convolutions, not the elementwise work of the mappings);
- inference: images per second of `model(images)` under no_grad, eval mode;
- training: optimizer steps per second (forward, set loss, backward, clipping, AdamW);
- peak memory: on CUDA the peak allocation over the measured passes; on the CPU the process's
  peak resident set (VmHWM, reset before the model is built through /proc/self/clear_refs, so
  rows of one `-m` sweep do not inherit each other's peak; it includes Python and the libraries).
Timings are the median of `repeats` after `warmup` calls (the first compiles the fast solver).
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_detr.config import SITES
from sparse_detr.bench.training_step import random_batch, training_step
from sparse_detr.models.detr import resolve_num_classes

CLEAR_REFS, PROC_STATUS = "/proc/self/clear_refs", "/proc/self/status"
COLUMNS = ("backbone", "attention (encoder/decoder/cross)", "image", "batch", "device", "parameters (M)", "trainable (M)",
           "alpha", "GFLOPs", "inference (img/s)", "training (steps/s)", "peak memory (MB)")


@dataclass
class Costs:
    parameters: int
    trainable: int
    alpha: int
    gflops: float
    images_per_second: float
    steps_per_second: float
    peak_memory_mb: float


def parameter_counts(model: torch.nn.Module) -> tuple[int, int, int]:
    """(total, trainable, learned alphas) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    alpha = sum(p.numel() for name, p in model.named_parameters() if name.endswith("pre_alpha"))
    return total, trainable, alpha


def forward_gflops(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images, mask)
    return counter.get_total_flops() / 1e9


def median_seconds(call, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path(CLEAR_REFS).write_text("5")  # Linux: reset the peak resident set size to the current one
    except OSError:
        pass  # not Linux, or not allowed: the peak since the process started


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path(PROC_STATUS).read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_costs(cfg, batch: int, height: int, width: int, device: torch.device, *, warmup: int = 1,
                  repeats: int = 5) -> Costs:
    """Build the configured model, count, and time inference and training on random images."""
    reset_peak_memory(device)
    model, step = training_step(cfg, batch, height, width, device)
    total, trainable, alpha = parameter_counts(model)
    images, mask, _ = random_batch(batch, height, width, device, resolve_num_classes(cfg))
    model.eval()
    gflops = forward_gflops(model, images, mask)

    def infer():
        with torch.no_grad():
            model(images, mask)

    inference = median_seconds(infer, device, warmup, repeats)
    model.train()
    training = median_seconds(step, device, warmup, repeats)
    return Costs(total, trainable, alpha, gflops, batch / inference, 1 / training, peak_memory_mb(device))


def markdown_row(cfg, batch: int, height: int, width: int, device: torch.device, costs: Costs) -> str:
    """One row under `markdown_header()`."""
    attention = "/".join(cfg.placement[site] for site in SITES)
    if "alpha_entmax" in attention:
        attention += f" (alpha {'learned from ' if cfg.attention.learn_alpha else ''}{cfg.attention.alpha})"
    cells = [cfg.backbone.name, attention, f"{height}x{width}", batch, str(device),
             f"{costs.parameters / 1e6:.2f}", f"{costs.trainable / 1e6:.2f}", costs.alpha, f"{costs.gflops:.3g}",
             f"{costs.images_per_second:.2f}", f"{costs.steps_per_second:.2f}", f"{costs.peak_memory_mb:.0f}"]
    return "| " + " | ".join(map(str, cells)) + " |"


def markdown_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "|".join("---" if i < 5 else "---:" for i in range(len(COLUMNS))) + "|"
