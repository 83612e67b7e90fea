"""Images given on the command line: one file or the files of a folder, decoded with PIL.

Every file is tried (not only known extensions): a file that does not decode is skipped with a
warning naming it, so a folder with notes or a broken download in it still runs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


def input_files(path: str | Path) -> list[Path]:
    """The file itself, or the visible files of a folder (not its subfolders) in name order.

    Raises FileNotFoundError for a missing path and ValueError for a folder without files.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r}: no such file or folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{str(path)!r} is an empty folder; give an image or a folder of images")
    return files


def read_image(path: Path) -> torch.Tensor | None:
    """[3, H, W] uint8 RGB, or None (with a warning naming the file) when it does not decode."""
    try:
        with Image.open(path) as image:
            return F.pil_to_tensor(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        log.warning("skipping %s: not a readable image (%s)", path, error)
        return None
