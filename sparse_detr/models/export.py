"""A trained DETR as a self-contained file: ONNX (onnxruntime, TensorRT, ...) or TorchScript.

The exported program takes `images` [B, 3, H, W] float32, normalised with ImageNet's mean and
std as the model's input (any H and W; one size per batch, no padding) and returns
`pred_logits` [B, queries, classes + 1] and `pred_boxes` [B, queries, 4] (cxcywh relative to the
image), the model's own outputs. The sparse mappings are swapped for their export-friendly
formulations (`export_mappings`) first.
"""
from __future__ import annotations

import copy
import importlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from sparse_detr.models.export_mappings import use_export_mappings

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
REQUIREMENTS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "torchscript": ()}  # the `export` extra
INPUT_NAMES, OUTPUT_NAMES = ["images"], ["pred_logits", "pred_boxes"]


class DetectorForExport(nn.Module):
    """images [B, 3, H, W] -> (pred_logits, pred_boxes) of the final decoder layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = use_export_mappings(copy.deepcopy(model)).eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(images)
        return outputs["pred_logits"], outputs["pred_boxes"]


def missing_packages(fmt: str) -> list[str]:
    """The packages `fmt` needs that cannot be imported here."""
    missing = []
    for name in REQUIREMENTS[fmt]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


@torch.no_grad()
def export_model(model: nn.Module, fmt: str, path: str | Path, sample: torch.Tensor) -> Path:
    """Write `model` as `fmt` to `path`, traced on `sample` [B, 3, H, W]; B, H and W stay dynamic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    detector = DetectorForExport(model).to(sample.device).eval()
    if fmt == "onnx":
        sample = sample.repeat(2 if len(sample) == 1 else 1, 1, 1, 1)  # torch.export fixes a dimension of size 1
        dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=32, max=8192),
                3: torch.export.Dim("width", min=32, max=8192)}
        folding = logging.getLogger("onnxscript")  # one warning per attention layer about folding splits
        level = folding.level
        folding.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(detector, (sample,), dynamo=True, input_names=INPUT_NAMES,
                                        output_names=OUTPUT_NAMES, dynamic_shapes={"images": dims})
        finally:
            folding.setLevel(level)
        program.save(str(path))
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # jit's deprecation notices, and tracer notes on shapes the tests cover
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.jit.save(torch.jit.trace(detector, (sample,), check_trace=False), str(path))
    else:
        raise ValueError(f"format={fmt!r}; choose one of: {', '.join(FORMATS)}")
    return path


def run_exported(fmt: str, path: str | Path, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pred_logits, pred_boxes) of an exported file on each batch of images: onnxruntime for ONNX,
    torch.jit for TorchScript, on the CPU."""
    if fmt == "onnx":
        import onnxruntime  # optional: the `export` extra

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda images: session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: images.detach().cpu().numpy()})  # noqa: E731
        return [tuple(torch.from_numpy(array) for array in run(images)) for images in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return [program(images.cpu()) for images in batches]
