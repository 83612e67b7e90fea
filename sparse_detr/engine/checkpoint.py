"""Training checkpoints that survive a kill at any moment, and exact resumption of random streams.

A checkpoint is written to a temporary file in the same folder, flushed to disk and renamed
over the previous one (`atomic_files`), so a crash or a full disk during a save leaves the
previous checkpoint intact. The run folder keeps the last two: `checkpoint.pth` and the one it
replaced, `checkpoint.prev.pth`, for when the newest turns out unreadable.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from sparse_detr.atomic_files import write_atomically
from sparse_detr.errors import UnreadableFile
from sparse_detr.models.detr_checkpoint import read_checkpoint
from sparse_detr.run_folder import CHECKPOINT_NAME, previous_checkpoint

def atomic_save(obj, path: str | Path, keep_previous: bool = False) -> None:
    """torch.save, atomically; keep_previous: the replaced file becomes `checkpoint.prev.pth`."""
    write_atomically(path, lambda handle: torch.save(obj, handle),
                     keep_previous=previous_checkpoint(path) if keep_previous else None)


def rng_states() -> dict:
    """Every random stream the training step draws from, in types that load with weights_only."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_training_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `atomic_save`: tensors and plain containers only (weights_only).

    An unreadable `checkpoint.pth` whose run folder keeps `checkpoint.prev.pth` says so, and how
    to go on from it: which one to use (or to start afresh) is the user's choice; nothing is deleted."""
    try:
        return read_checkpoint(path)
    except UnreadableFile as error:
        previous = previous_checkpoint(path)
        if Path(path).name != CHECKPOINT_NAME or not previous.is_file():
            raise
        raise UnreadableFile(f"{error}. The previous checkpoint {previous} exists: to resume from it, "
                             f"`mv {previous} {path}`") from error
