"""Data sets for training and evaluation: `build_dataset(data_cfg, split)` and `num_classes(data_cfg)`.

`data_cfg` is best the checked `DataConfig` (`validate(cfg).data`), which is used as it is; a
`data` node of a composed config (DictConfig or dict) is checked and converted once per call.

`data=shapes` (default, generated), `data=coco` (COCO 2017) and `data=coco_format` (any
COCO-format folder) all load through `coco.CocoDetection`. Batch with `collate.collate`.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from sparse_detr.data.config import DataConfig

# The builders import `coco`, `shapes` and `transforms` (torch) when called: the config schema
# imports `sparse_detr.data.config`, which runs this file, and checking a config must not load torch.
SPLITS = ("train", "val")


def as_data_config(cfg):
    """The `data` node (DictConfig, dict or DataConfig) as a checked DataConfig."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    return cfg if isinstance(cfg, DataConfig) else DataConfig(**cfg)


def build_dataset(cfg, split: str):
    """The `split` ("train": augmented, "val": not) of the configured data set, checked before use.

    ds[i] -> (image [3, H, W] float normalised with ImageNet mean/std, target dict with boxes [N, 4]
    cxcywh in [0, 1], labels [N] int64, image_id, orig_size [2] and size [2] (h, w) int64).
    """
    from sparse_detr.data import coco, shapes
    from sparse_detr.data.transforms import build_transforms

    if split not in SPLITS:
        raise ValueError(f"split={split!r}; choose one of: {', '.join(SPLITS)}")
    cfg = as_data_config(cfg)
    if cfg.name == "coco":
        images, annotations = coco.coco_paths(cfg.root, split)
        label_to_category = list(range(coco.COCO_NUM_CLASSES))
    else:
        if cfg.name == "shapes":
            images, annotations = shapes.shapes_paths(cfg, split)
            train_annotations = shapes.shapes_paths(cfg, "train")[1]
        else:
            images, annotations = getattr(cfg, f"{split}_images"), getattr(cfg, f"{split}_annotations")
            train_annotations = cfg.train_annotations
        label_to_category = coco.category_ids(train_annotations)
    return coco.CocoDetection(images, annotations, label_to_category, build_transforms(cfg, train=split == "train"),
                              preload=cfg.name == "shapes")  # generated once, never edited: decoded once


def evaluation_dataset(cfg, split: str):
    """A split as evaluation sees it: the training images too without random flips or resizes."""
    from sparse_detr.data.transforms import build_transforms

    cfg = as_data_config(cfg)
    dataset = build_dataset(cfg, split)
    if split == "train":
        dataset.transforms = build_transforms(cfg, train=False)
    return dataset


def num_classes(cfg) -> int:
    """Number of classes without building the data set: 91 for COCO, else read from the categories."""
    from sparse_detr.data import coco

    name = cfg["name"] if isinstance(cfg, dict) else cfg.name
    if name == "coco":  # known without the data on disk (or data.root), so a COCO model builds anywhere
        return coco.COCO_NUM_CLASSES
    cfg = as_data_config(cfg)
    if cfg.name == "shapes":
        return cfg.num_categories
    return len(coco.category_ids(cfg.train_annotations))
