"""A split's images decoded once and kept in one uint8 buffer.

For the built-in shapes, decoding a PNG costs more than all the rest of a sample's preparation
(augmentation, target, seeding), and the whole split is small: decoding it once at start takes
seconds and saves that work in every epoch. One buffer, not a tensor per image, so DataLoader
workers share it (fork) or receive it as one array (spawn) rather than thousands of tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

CHANNELS = 3
MAX_BYTES = 2**30     # larger splits are read from disk at every access


def decoded_bytes(sizes: list[tuple[int, int]]) -> int:
    """Bytes of the uint8 RGB images of the given (height, width)s."""
    return sum(CHANNELS * height * width for height, width in sizes)


class DecodedImages:
    """images[i] -> a uint8 [3, H, W] copy of image i, or the error reading it raised (raised again
    at every access, so the data set skips it as it skips a file that fails on disk)."""

    def __init__(self, paths: list[Path], sizes: list[tuple[int, int]],
                 read: Callable[[Path, list[int]], torch.Tensor]):
        self.shapes = [(CHANNELS, height, width) for height, width in sizes]
        self.offsets = np.cumsum([0] + [int(np.prod(shape)) for shape in self.shapes])
        self.buffer = np.empty(self.offsets[-1], dtype=np.uint8)
        self.errors: dict[int, Exception] = {}
        for index, (path, (height, width)) in enumerate(zip(paths, sizes)):
            try:
                image = read(path, [height, width])
            except (OSError, Image.DecompressionBombError) as error:
                self.errors[index] = error
                continue
            self.buffer[self.offsets[index]:self.offsets[index + 1]] = image.numpy().reshape(-1)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self.errors:
            raise self.errors[index]
        pixels = self.buffer[self.offsets[index]:self.offsets[index + 1]]
        return torch.from_numpy(pixels.reshape(self.shapes[index]).copy())
