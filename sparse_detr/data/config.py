"""The `data` node of the config: which data set, where it lives, how it is augmented and batched.

Defaults are those of the built-in `shapes` set, so the package runs out of the box. Light (no
torch), as `sparse_detr.config` imports it into the schema of every entry point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from sparse_detr.checks import check_choice, check_range
from sparse_detr.errors import ConfigError

DATA_NAMES = ("shapes", "coco", "coco_format")
SHAPE_NAMES = ("rectangle", "ellipse", "triangle", "cross", "diamond", "ring")
DETR_SCALES = tuple(range(480, 801, 32))  # shorter side of training images
DETR_MAX_SIZE, DETR_VAL_SIZE = 1333, 800
COCO_LAYOUT = ("train2017/", "val2017/", "annotations/instances_train2017.json",
               "annotations/instances_val2017.json")


@dataclass
class DataConfig:
    name: str = "shapes"                    # shapes | coco | coco_format
    root: Optional[str] = None              # coco: the COCO folder; shapes: cache, data in <root>/<params hash>
    train_images: Optional[str] = None      # coco_format: folder of the training images
    train_annotations: Optional[str] = None  # coco_format: COCO-format JSON of the training split
    val_images: Optional[str] = None
    val_annotations: Optional[str] = None

    # shapes: generation parameters (a change makes a new data set in a new cache folder)
    num_train: int = 3000
    num_val: int = 300
    image_size: int = 128                   # side of the square images, pixels
    num_categories: int = 4                 # the first N of SHAPE_NAMES
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: float = 0.2            # object side as a fraction of the image side
    max_object_size: float = 0.5
    seed: int = 0

    # augmentation (DETR's recipe). Sizes left null are DETR's for coco/coco_format, and for shapes
    # follow image_size: train scales image_size * 0.875..1.125, val size image_size.
    hflip: float = 0.5                      # probability of a horizontal flip (train)
    train_scales: Optional[List[int]] = None  # shorter side, one drawn per training image
    max_size: Optional[int] = None          # cap on the longer side after resizing
    val_size: Optional[int] = None          # shorter side at validation
    crop: bool = False                      # DETR's second branch, chosen with p=0.5: resize, random crop, resize
    crop_scales: List[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min_size: int = 384
    crop_max_size: int = 600

    batch_size: int = 16
    num_workers: int = 1

    def __post_init__(self):
        check_choice("data.name", self.name, DATA_NAMES)
        self._derive_sizes()
        for key in ("num_train", "num_val", "min_objects", "val_size", "max_size", "crop_min_size", "batch_size"):
            check_range(f"data.{key}", getattr(self, key), low=1)
        check_range("data.image_size", self.image_size, low=32)
        check_range("data.num_categories", self.num_categories, low=1, high=len(SHAPE_NAMES))
        check_range("data.max_objects", self.max_objects, low=self.min_objects)
        check_range("data.min_object_size", self.min_object_size, low=0.05, high=1.0)
        check_range("data.max_object_size", self.max_object_size, low=self.min_object_size, high=1.0)
        check_range("data.hflip", self.hflip, low=0.0, high=1.0)
        check_range("data.crop_max_size", self.crop_max_size, low=self.crop_min_size)
        check_range("data.num_workers", self.num_workers, low=0)
        for key in ("train_scales", "crop_scales"):
            if not getattr(self, key) or min(getattr(self, key)) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)!r} must be a non-empty list of positive sizes")
        if self.name == "coco" and not self.root:
            raise ConfigError("data=coco needs data.root=/path/to/coco or the COCO_ROOT environment variable; "
                              "expected layout: " + ", ".join(f"<root>/{p}" for p in COCO_LAYOUT))
        if self.name == "coco_format":
            missing = [k for k in ("train_images", "train_annotations", "val_images", "val_annotations")
                       if not getattr(self, k)]
            if missing:
                raise ConfigError("data=coco_format needs " + " ".join(f"data.{k}=..." for k in missing))

    def _derive_sizes(self) -> None:
        """Fill the resize sizes left null: DETR's for COCO-format data, mild jitter around image_size for shapes."""
        if self.name != "shapes":
            scales, max_size, val_size = DETR_SCALES, DETR_MAX_SIZE, DETR_VAL_SIZE
        else:
            scales = [round(self.image_size * f) for f in (0.875, 0.9375, 1.0, 1.0625, 1.125)]
            max_size, val_size = max(scales), self.image_size
        self.train_scales = list(scales) if self.train_scales is None else self.train_scales
        self.max_size = max_size if self.max_size is None else self.max_size
        self.val_size = val_size if self.val_size is None else self.val_size
