"""COCO-format detection data: one loader for COCO 2017, any COCO-format folder and the shapes set.

The annotation file is checked and cleaned when the data set is built, before any training, so
bad data either stops the run at once with a message that says what is wrong, or is repaired or
skipped with a warning that counts it:

  not a COCO file, malformed entries, unknown category ids, no usable image -> DataError
  image listed but missing on disk          -> image skipped (warning)
  box with zero or negative size            -> box dropped (warning)
  box partly outside the image              -> box clipped to the image (warning)
  box wholly outside the image              -> box dropped (warning)
  annotation of an image not in the file    -> annotation dropped (warning)
  missing, repeated or non-positive annotation ids -> renumbered (warning; COCOeval needs ids >= 1)
  crowd boxes                               -> kept for COCOeval, left out of training targets
  image without annotations                 -> kept: a valid negative, and part of evaluation
  image that fails to decode, claims more pixels than PIL will decode (a decompression bomb),
  has the wrong size, or resizes to no pixels (found only when read) -> the next image is
                                               used instead (warning); ten in a row is an error
  repeated image ids                        -> DataError naming them
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from pycocotools.coco import COCO

from sparse_detr.data.config import COCO_LAYOUT
from sparse_detr.data.decoded_images import MAX_BYTES, DecodedImages, decoded_bytes
from sparse_detr.data.transforms import UnusableImage
from sparse_detr.errors import UserError

log = logging.getLogger(__name__)

COCO_NUM_CLASSES = 91                 # DETR's convention: label = COCO category id (1..90)
MAX_BAD_IN_A_ROW = 10


class DataError(UserError):
    """The data set on disk cannot be used as it is."""


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(images folder, annotation file) of a COCO 2017 split; DataError naming the layout if absent."""
    root = Path(root).expanduser()
    images, annotations = root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"
    missing = [path for path in (images, annotations) if not path.exists()]
    if missing:
        layout = "\n".join(f"  {root / part}" for part in COCO_LAYOUT)
        raise DataError(f"COCO 2017 not found: missing {', '.join(map(str, missing))}.\n"
                        f"Expected layout (set data.root or COCO_ROOT; nothing is downloaded):\n{layout}")
    return images, annotations


def read_annotations(path: str | Path) -> dict:
    """The parsed JSON with its three lists, or DataError saying why not."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON: {error}") from error
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list) for key in keys):
        raise DataError(f"{path} is not a COCO detection file: "
                        "it needs the lists 'images', 'annotations' and 'categories'")
    return data


def category_ids(path: str | Path) -> list[int]:
    """Sorted category ids of an annotation file: label i of the model is category label_to_category[i]."""
    ids = [category.get("id") for category in read_annotations(path)["categories"]]
    if not ids or not all(isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise DataError(f"{path}: 'categories' must list unique integer ids, got {ids[:20]}")
    return sorted(ids)


def clean_annotations(data: dict, images_dir: Path, known_categories: set[int], source: str) -> tuple[dict, Counter]:
    """Check a COCO dict against the image folder and categories -> (cleaned copy, counts of what was fixed)."""
    issues = Counter()
    images = []
    for image in data["images"]:
        if not (isinstance(image, dict) and isinstance(image.get("id"), int) and isinstance(image.get("file_name"), str)
                and _positive_int(image.get("width")) and _positive_int(image.get("height"))):
            raise DataError(f"{source}: malformed image entry {str(image)[:200]} (needs id, file_name, width, height)")
        if (images_dir / image["file_name"]).is_file():
            images.append(image)
        else:
            issues["images missing on disk (skipped)"] += 1
    repeated = sorted(i for i, n in Counter(image["id"] for image in data["images"]).items() if n > 1)
    if repeated:  # boxes are looked up by image id: one image would be trained with another's boxes
        raise DataError(f"{source}: {len(repeated)} image ids are used by more than one image: "
                        f"{repeated[:20]}{' ...' if len(repeated) > 20 else ''}; give every image its own id")
    if not images:
        raise DataError(f"{source}: none of the {len(data['images'])} images listed is in {images_dir}")
    by_id = {image["id"]: image for image in images}
    listed = {image["id"] for image in data["images"]}

    unknown = Counter()
    annotations = []
    for ann in data["annotations"]:
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)
                and isinstance(ann.get("image_id"), int) and isinstance(ann.get("category_id"), int)):
            raise DataError(f"{source}: malformed annotation {str(ann)[:200]} "
                            "(needs image_id, category_id, bbox [x, y, w, h])")
        if ann["category_id"] not in known_categories:
            unknown[ann["category_id"]] += 1
            continue
        if ann["image_id"] not in by_id:
            if ann["image_id"] not in listed:
                issues["annotations of image ids not in the file (dropped)"] += 1
            continue
        image = by_id[ann["image_id"]]
        x, y, w, h = map(float, bbox)
        if w <= 0 or h <= 0:
            issues["boxes with zero or negative size (dropped)"] += 1
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(image["width"])), min(y + h, float(image["height"]))
        if x1 <= x0 or y1 <= y0:
            issues["boxes outside the image (dropped)"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            issues["boxes partly outside the image (clipped)"] += 1
        annotations.append({**ann, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": ann.get("area", (x1 - x0) * (y1 - y0)),
                            "iscrowd": ann.get("iscrowd", 0)})
    if unknown:
        raise DataError(f"{source}: {sum(unknown.values())} annotations have category ids that are not among the "
                        f"categories {sorted(known_categories)}: {dict(unknown.most_common(10))}")

    ids = [ann.get("id") for ann in annotations]
    if not all(_positive_int(i) for i in ids) or len(set(ids)) != len(ids):
        issues["annotation ids missing, repeated or < 1 (renumbered)"] += len(annotations)
        annotations = [{**ann, "id": i + 1} for i, ann in enumerate(annotations)]
    return {**data, "images": images, "annotations": annotations}, issues


def _positive_int(value) -> bool:
    return isinstance(value, int) and value > 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format split: (image [3, H, W], target) pairs, see `sparse_detr.data.build_dataset`.

    `label_to_category[label]` is the category id of a label; `coco` is the pycocotools COCO object
    of the cleaned annotations, with the data set's own category ids, for COCOeval. With `preload`
    (files that never change, such as the generated shapes) a split of at most `MAX_BYTES` decoded
    is decoded once here and read from memory after.
    """

    def __init__(self, images_dir, annotation_file, label_to_category: list[int], transforms, preload: bool = False):
        self.images_dir = Path(images_dir).expanduser()
        if not self.images_dir.is_dir():
            raise DataError(f"image folder not found: {self.images_dir}")
        self.label_to_category = list(label_to_category)
        self.num_classes = len(self.label_to_category)
        self.transforms = transforms
        data = read_annotations(annotation_file)
        self.category_to_label = {c: label for label, c in enumerate(self.label_to_category)}
        known = set(self.category_to_label) & {c.get("id") for c in data["categories"] if isinstance(c, dict)}
        data, self.issues = clean_annotations(data, self.images_dir, known, str(annotation_file))
        for issue, count in self.issues.items():
            log.warning("%s: %d %s", annotation_file, count, issue)

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.images = data["images"]
        sizes = [(image["height"], image["width"]) for image in self.images]
        self.decoded = None
        if preload and decoded_bytes(sizes) <= MAX_BYTES:
            paths = [self.images_dir / image["file_name"] for image in self.images]
            self.decoded = DecodedImages(paths, sizes, self._read)
        empty = sum(not self._objects(image) for image in self.images)
        log.info("%s: %d images (%d without objects), %d classes",
                 annotation_file, len(self.images), empty, self.num_classes)
        self.unreadable = 0

    def _objects(self, image: dict) -> list[dict]:
        return [a for a in self.coco.imgToAnns[image["id"]] if not a["iscrowd"]]

    def _target(self, image: dict) -> dict:
        """Training target of one image: non-crowd boxes as xyxy pixels, labels, ids and size.

        Made on access, not stored: a million small tensors would each need a file descriptor
        when the data set is sent to DataLoader workers started with spawn or forkserver.
        """
        objects = self._objects(image)
        boxes = torch.tensor([a["bbox"] for a in objects], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        size = torch.tensor([image["height"], image["width"]], dtype=torch.int64)
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in objects], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels,
                "image_id": torch.tensor(image["id"], dtype=torch.int64), "orig_size": size, "size": size}

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        for attempt in range(MAX_BAD_IN_A_ROW):
            position = (index + attempt) % len(self.images)
            info = self.images[position]
            path = self.images_dir / info["file_name"]
            try:
                if self.decoded is not None:
                    pixels = self.decoded[position]
                else:
                    pixels = self._read(path, [info["height"], info["width"]])
                return self.transforms(pixels, self._target(info))
            except (OSError, Image.DecompressionBombError, UnusableImage) as error:
                self.unreadable += 1
                log.warning("skipping unreadable image %s (%s: %s); %d so far in this process",
                            path, type(error).__name__, error, self.unreadable)
        raise DataError(f"{MAX_BAD_IN_A_ROW} unreadable images in a row, the last {path}; check the data set")

    @staticmethod
    def _read(path: Path, size: list[int]) -> torch.Tensor:
        with Image.open(path) as image:
            image = F.pil_to_tensor(image.convert("RGB"))
        if list(image.shape[-2:]) != size:
            raise OSError(f"image is {tuple(image.shape[-2:])} (h, w), the annotation file says {tuple(size)}")
        return image


def category_table(dataset: CocoDetection) -> list[dict]:
    """[{"id": category id, "name": its name}] in label order: what a trained model's labels mean.

    Saved in training checkpoints, so a model can name its classes without its data set. A label
    whose id the file does not list (COCO's unused ids) is named by its id.
    """
    return [{"id": int(category), "name": str(dataset.coco.cats.get(category, {}).get("name", category))}
            for category in dataset.label_to_category]
