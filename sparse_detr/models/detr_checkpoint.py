"""Reading and writing model weights in the original DETR's checkpoint format, without unpickling code.

DETR's own checkpoints are `{"model": state_dict, ...}`; training checkpoints of DETR also carry
`args` (an `argparse.Namespace`), which is the one non-tensor class we allow to be unpickled.
A Hugging Face DETR folder (`save_pretrained`) is read too, its keys renamed to ours.
"""
from __future__ import annotations

import argparse
import errno
from pathlib import Path

import torch
from torch import nn

from sparse_detr.errors import UnreadableFile
from sparse_detr.hf_folder import is_hf_detr_folder
from sparse_detr.models.hf_detr import load_hf_detr_folder

SAFE_GLOBALS = [argparse.Namespace]
# Lines of torch.load's errors that say nothing about the file at hand.
BOILERPLATE = ("Weights only load failed", "In PyTorch", "Please file an issue", "Check the documentation")


def load_error_detail(error: Exception) -> tuple[bool, str]:
    """(whether the file holds a forbidden class or function, the one informative line of the
    torch.load error: its messages run to several paragraphs and change between versions)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    forbidden = [line for line in lines if "GLOBAL" in line]
    detail = (forbidden or [line for line in lines if not line.startswith(BOILERPLATE)] or [""])[0]
    detail = detail.split("WeightsUnpickler error: ")[-1].split(". ")[0]
    return bool(forbidden), f"{type(error).__name__}: {detail}"


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True and DETR's `args` allowed; UnreadableFile, naming the file,
    for a file that is damaged, truncated, not a checkpoint, or holds objects that could run code.

    A Hugging Face DETR folder gives `{"model": its weights under our key names}`.
    """
    path = Path(path).expanduser()
    if is_hf_detr_folder(path):
        return {"model": load_hf_detr_folder(path)}
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no such file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises RuntimeError, UnpicklingError, UnicodeDecodeError, OSError, ...
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EIO):
            raise UnreadableFile(f"checkpoint {path} is unreadable: {error.strerror}") from error
        forbidden, detail = load_error_detail(error)
        if forbidden:
            raise UnreadableFile(
                f"checkpoint {path} holds objects that are not safe to load (only tensors, plain "
                f"containers and argparse.Namespace are allowed): {detail}") from error
        raise UnreadableFile(f"checkpoint {path} is unreadable: truncated, damaged or not a PyTorch "
                             f"checkpoint ({detail})") from error


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model's weights from a DETR-style checkpoint (`{"model": ...}`) or a bare state dict."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a model checkpoint: expected {'model': state_dict} or a state dict of tensors")
    return state


def load_detr_weights(model: nn.Module, path: str | Path, strict: bool = True):
    """Load an official (or our own) DETR checkpoint into `model`; returns torch's key report."""
    return model.load_state_dict(model_state_dict(read_checkpoint(path)), strict=strict)


def save_detr_weights(model: nn.Module, path: str | Path) -> None:
    """Write `{"model": state_dict}` as DETR's published checkpoints are."""
    torch.save({"model": model.state_dict()}, path)
