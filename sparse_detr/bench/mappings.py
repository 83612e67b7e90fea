"""Benchmark the attention mappings against softmax: time, memory, first call, attention block.

    python -m sparse_detr.bench.mappings [--repeats N] [--quick] [--threads T]

Prints Markdown tables. Shapes are DETR's attention sites at batch 2, 8 heads: encoder
self-attention (850 x 850 tokens, a ~800 x 1088 image after the stride-32 backbone), decoder
cross-attention (100 queries x 850 keys) and decoder self-attention (100 x 100).
- time: median of `y = f(x); y.backward(g)` in float32; all candidates of a shape run
  round-robin within each repeat, so a busy machine slows them alike and the ratio to softmax
  stays meaningful.
- memory: bytes held between forward and backward (tensors saved for backward plus the output,
  counted once per storage). This is what grows with depth when a model trains; on CUDA the
  peak allocation above the inputs (torch.cuda.max_memory_allocated) is reported as well.
- first call: the first forward+backward at that shape in this process; for "fast" the first
  shape includes compiling (inductor's on-disk cache, if warm, shortens it). Later shapes reuse
  the kernel: a first call close to the median shows there was no recompilation.
- training step: one optimizer step of a whole DETR (forward, set loss, backward, clipping,
  AdamW) from a random initialisation with the mapping at every site (`placement=all`), for the
  smoke model (batch 4, 64 x 64) and the R50 model (batch 2, 512 x 683).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import time

import torch

from sparse_detr.bench.training_step import training_step
from sparse_detr.config import load_config
from sparse_detr.models.mappings import attention_mapping

SHAPES = {"encoder": (850, 850), "cross": (100, 850), "decoder-self": (100, 100)}
GRID = (25, 34)  # the feature map of the 850 keys, for the mappings over the image grid
BATCH, HEADS, HEAD_DIM = 2, 8, 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _candidates(quick: bool) -> dict[str, torch.nn.Module]:
    """name -> mapping module; alpha-entmax with one learned alpha per head (init 1.5)."""
    impls = ("fast",) if quick else ("fast", "eager", "reference")
    out = {"softmax": attention_mapping("softmax")}
    for name in ("sparsemax", "entmax15", "alpha_entmax"):
        extra = {"learn_alpha": True, "num_heads": HEADS} if name == "alpha_entmax" else {}
        for impl in impls:
            out[f"{name} ({impl})"] = attention_mapping(name, impl=impl, **extra)
    return out


def _retained_bytes(step_forward) -> int:
    """Bytes alive between forward and backward: saved tensors + output, one count per storage."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        leaves, y = step_forward()
    for leaf in leaves:  # inputs and parameters exist anyway
        storages.pop(leaf.untyped_storage().data_ptr(), None)
    storages[y.untyped_storage().data_ptr()] = y.untyped_storage().nbytes()
    return sum(storages.values())


def _timed(calls: dict, repeats: int, device: torch.device) -> dict[str, dict]:
    """calls: name -> call(). The first call of each (one at a time), then `repeats` round-robin
    calls, so a busy machine slows every candidate alike -> {name: {"first", "times", "median"}}."""
    stats = {}

    def clock(call) -> float:
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        return time.perf_counter() - start

    for name, call in calls.items():
        stats[name] = {"first": clock(call), "times": []}
    for _ in range(repeats):
        for name, call in calls.items():
            stats[name]["times"].append(clock(call))
    for s in stats.values():
        s["median"] = statistics.median(s["times"])
    return stats


def _measure(steps: dict, repeats: int, device: torch.device) -> dict[str, dict]:
    """steps: name -> (forward() -> (leaves, output), grad). Round-robin timing + memory."""
    def forward_backward(forward, grad):
        _, y = forward()
        y.backward(grad)

    stats = _timed({name: (lambda f=forward, g=grad: forward_backward(f, g)) for name, (forward, grad) in steps.items()},
                   repeats, device)
    for name, (forward, grad) in steps.items():
        stats[name]["retained"] = _retained_bytes(forward)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            forward_backward(forward, grad)
            stats[name]["peak"] = torch.cuda.max_memory_allocated(device) - base
    return stats


def _table(title: str, stats_by_shape: dict[str, dict], device: torch.device) -> str:
    cuda = device.type == "cuda"
    head = "| mapping | shape | median fwd+bwd (ms) | x softmax | memory (MB) | x softmax | first call (s) |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if cuda:
        head += " CUDA peak x softmax |"
        rule += "---:|"
    lines = [f"### {title}", "", head, rule]
    names = list(next(iter(stats_by_shape.values())))
    for name in names:
        for shape, stats in stats_by_shape.items():
            s, soft = stats[name], stats["softmax"]
            row = (f"| {name} | {shape} | {s['median'] * 1e3:.2f} | {s['median'] / soft['median']:.2f} | "
                   f"{s['retained'] / 2**20:.1f} | {s['retained'] / soft['retained']:.2f} | {s['first']:.2f} |")
            if cuda:
                row += f" {s['peak'] / max(soft['peak'], 1):.2f} |"
            lines.append(row)
    return "\n".join(lines)


def mapping_section(args, device: torch.device) -> str:
    """The mapping alone: scores [2, 8, queries, keys] -> probabilities, forward + backward.

    The softmax row is plain `torch.softmax`, the cost a user pays without this package (the
    other rows go through the mapping modules, dtype and mask handling included)."""
    results = {}
    candidates = _candidates(args.quick)
    candidates["softmax"] = functools.partial(torch.softmax, dim=-1)
    for shape, (queries, keys) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, HEADS, queries, keys, generator=gen).to(device).requires_grad_()
        grad = torch.randn(BATCH, HEADS, queries, keys, generator=gen).to(device)
        steps = {}
        for name, mapping in candidates.items():
            params = list(mapping.to(device).parameters()) if isinstance(mapping, torch.nn.Module) else []
            steps[name] = ((lambda m=mapping, params=params: ([x, *params], m(x))), grad)
        results[f"{queries}x{keys}"] = _measure(steps, args.repeats, device)
    return _table("Mapping forward+backward, float32", results, device)


def grid_section(args, device: torch.device) -> str:
    """The grid mappings (TVMax, attention.tv_lambda 0.1) where the keys are a 25 x 34 map."""
    results = {}
    candidates = {"softmax": attention_mapping("softmax"), "tvmax (fast, lambda 0.1)": attention_mapping("tvmax")}
    for shape, (queries, keys) in SHAPES.items():
        if keys != GRID[0] * GRID[1]:
            continue
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, HEADS, queries, keys, generator=gen).to(device).requires_grad_()
        grad = torch.randn(BATCH, HEADS, queries, keys, generator=gen).to(device)
        steps = {name: ((lambda m=module.to(device): ([x], m(x, key_grid=GRID))), grad) for name, module in candidates.items()}
        results[f"{queries}x{keys} ({GRID[0]}x{GRID[1]} grid)"] = _measure(steps, args.repeats, device)
    return _table("Grid mappings forward+backward, float32", results, device)


def attention_section(args, device: torch.device) -> str:
    """The attention block: softmax(Q K^T / sqrt(d)) V with key padding, forward + backward.

    Every batch element pads its last 10% of keys, as batched images of different sizes do."""
    results = {}
    candidates = _candidates(quick=True)
    for shape, (queries, keys) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen).to(device).requires_grad_()
                   for n in (queries, keys, keys))
        mask = torch.zeros(BATCH, keys, dtype=torch.bool, device=device)
        mask[:, keys - keys // 10:] = True
        grad = torch.randn(BATCH, HEADS, queries, HEAD_DIM, generator=gen).to(device)

        def block(m):
            weights = m(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM), key_padding_mask=mask)
            return [q, k, v, *m.parameters()], weights @ v

        steps = {name: ((lambda m=module.to(device): block(m)), grad) for name, module in candidates.items()}
        results[f"{queries}x{keys}"] = _measure(steps, args.repeats, device)
    return _table("Attention block (QK^T, key padding, mapping, @V) forward+backward, float32", results, device)


# (label, config overrides, batch size, image height, image width) of the training-step section.
TRAINING_MODELS = [("smoke", ["experiment=smoke"], 4, 64, 64),
                   ("R50", ["experiment=detr_r50_coco"], 2, 512, 683)]
# (placement=all unless named: TVMax has no grid at the decoder self-attention)
TRAINING_ATTENTION = {"softmax": ["attention=softmax"], "sparsemax": ["attention=sparsemax"],
                      "entmax15": ["attention=entmax15"],
                      "alpha_entmax (learned)": ["attention=alpha_entmax"],
                      "tvmax (lambda 0.1), placement=cross": ["attention=tvmax", "placement=cross"]}


def _training_step(overrides: list[str], batch: int, height: int, width: int, device: torch.device):
    """A closure running one training step of the configured DETR on a fixed random batch."""
    if not any(override.startswith("placement=") for override in overrides):
        overrides = [*overrides, "placement=all"]
    return training_step(load_config(overrides), batch, height, width, device)[1]


def training_section(args, device: torch.device) -> str:
    """One DETR training step per attention choice, as a ratio to softmax."""
    repeats = max(3, args.repeats // 2)
    lines = ["### Training step of the whole model, placement=all unless named, float32", "",
             "| model | attention | median step (ms) | x softmax | first step (s) |", "|---|---|---:|---:|---:|"]
    for label, overrides, batch, height, width in TRAINING_MODELS:
        stats = _timed({name: _training_step([*overrides, *choice], batch, height, width, device)
                        for name, choice in TRAINING_ATTENTION.items()}, repeats, device)
        soft = stats["softmax"]["median"]
        for name, s in stats.items():
            lines.append(f"| {label} | {name} | {s['median'] * 1e3:.1f} | {s['median'] / soft:.2f} | {s['first']:.2f} |")
    return "\n".join(lines)


SECTIONS = [mapping_section, grid_section, attention_section, training_section]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per candidate (median)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, only the fast impl and softmax")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    device = torch.device(args.device)
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"machine: {platform.machine()} {platform.processor()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {device}, load average {load}, "
          f"compile {'off' if os.environ.get('SPARSE_DETR_COMPILE') == '0' else 'on'}, repeats {args.repeats}\n")
    for section in SECTIONS:
        print(section(args, device), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
