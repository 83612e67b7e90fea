"""Joint image + box transforms, after DETR's `datasets/transforms.py`.

Each transform maps (image, target) -> (image, target). Before `Normalize` the image is a uint8
tensor [3, H, W] and `target["boxes"]` is [N, 4] float xyxy in pixels; `Normalize` turns them into
the model's input: a float image normalised with ImageNet statistics and boxes as cxcywh relative
to the image size. Randomness comes from torch's global RNG only, so a run resumed with its RNG
states restored draws the same augmentations.
"""
from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as F
from torchvision.ops import box_convert

class UnusableImage(Exception):
    """An image that decodes but cannot be transformed (e.g. 6000x1: resizing leaves no pixel row);
    the data set skips it like an unreadable file."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform() -> float:
    return torch.rand(()).item()


def _randint(low: int, high: int) -> int:
    """An integer in [low, high], inclusive."""
    return int(torch.randint(low, high + 1, ()).item())


def _choice(values):
    return values[_randint(0, len(values) - 1)]


def _set_size(target: dict, height: int, width: int) -> dict:
    return {**target, "size": torch.tensor([height, width], dtype=torch.int64)}


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if _uniform() >= self.p:
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0])
        boxes = boxes + torch.tensor([width, 0.0, width, 0.0])  # x0, x1 -> width - x1, width - x0
        return F.horizontal_flip(image), {**target, "boxes": boxes}


def resized_shape(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) with the shorter side `size`, shrunk so that the longer side stays <= max_size (DETR's rule)."""
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    shape = (int(size * height / width), size) if width < height else (size, int(size * width / height))
    if min(shape) < 1:
        raise UnusableImage(f"a {height}x{width} (h x w) image resizes to {shape[0]}x{shape[1]} pixels "
                            f"(shorter side {size}, longer side at most {max_size})")
    return shape


class RandomResize:
    """Resize the shorter side to one of `sizes` (drawn uniformly), the longer side capped at `max_size`."""

    def __init__(self, sizes, max_size: int | None = None):
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        height, width = image.shape[-2:]
        new_h, new_w = resized_shape(height, width, _choice(self.sizes), self.max_size)
        image = F.resize(image, [new_h, new_w], antialias=True)
        scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
        return image, _set_size({**target, "boxes": target["boxes"] * scale}, new_h, new_w)


class RandomSizeCrop:
    """Crop a random window with sides in [min_size, max_size]; drop the boxes left without area."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        height, width = image.shape[-2:]
        crop_w = _randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = _randint(min(self.min_size, height), min(height, self.max_size))
        top, left = _randint(0, height - crop_h), _randint(0, width - crop_w)
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([crop_w, crop_h, crop_w, crop_h], dtype=torch.float32))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {**target, "boxes": boxes[keep], "labels": target["labels"][keep]}
        return F.crop(image, top, left, crop_h, crop_w), _set_size(target, crop_h, crop_w)


class RandomSelect:
    """Apply `first` with probability p, else `second`."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target):
        return self.first(image, target) if _uniform() < self.p else self.second(image, target)


class Normalize:
    """uint8 image -> float normalised with ImageNet mean/std; xyxy pixel boxes -> cxcywh in [0, 1]."""

    def __call__(self, image, target):
        height, width = image.shape[-2:]
        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
        boxes = box_convert(target["boxes"], "xyxy", "cxcywh") / torch.tensor([width, height, width, height])
        return image, _set_size({**target, "boxes": boxes}, height, width)


def build_transforms(cfg, train: bool) -> Compose:
    """DETR's recipe from the `data` config: flip + multi-scale resize (+ optional crop branch) for training."""
    if not train:
        return Compose([RandomResize([cfg.val_size], cfg.max_size), Normalize()])
    resize = RandomResize(cfg.train_scales, cfg.max_size)
    if cfg.crop:
        resize = RandomSelect(resize, Compose([RandomResize(cfg.crop_scales),
                                               RandomSizeCrop(cfg.crop_min_size, cfg.crop_max_size),
                                               RandomResize(cfg.train_scales, cfg.max_size)]))
    return Compose([RandomHorizontalFlip(cfg.hflip), resize, Normalize()])
