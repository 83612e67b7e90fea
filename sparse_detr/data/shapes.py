"""The built-in synthetic data set: coloured shapes on textured, noisy backgrounds, with exact boxes.

Generated once per parameter set, deterministically from the seed (each image has its own RNG
keyed by (seed, split, index)), and written as COCO-format JSON plus PNG images, so it loads
through the same loader as any COCO-format data set. Positions, sizes, counts, colours and
categories are all random: a model that does not look at the image cannot score.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sparse_detr.atomic_files import temporary_name
from sparse_detr.data import SPLITS
from sparse_detr.data.config import SHAPE_NAMES

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1                 # bump when the drawing changes, so old caches are not reused
MIN_VISIBLE = 0.6                     # an object keeps at least this fraction of its pixels visible
PLACEMENT_TRIES = 20
CHUNK = 250                           # images per task of the generating processes
MAX_WORKERS = 8


def generation_params(cfg) -> dict:
    keys = ("num_train", "num_val", "image_size", "num_categories", "min_objects", "max_objects",
            "min_object_size", "max_object_size", "seed")
    return {"version": GENERATOR_VERSION, **{key: getattr(cfg, key) for key in keys}}


def shapes_folder(cfg) -> Path:
    """`<root>/<hash of the generation params>`, root defaulting to ~/.cache/sparse_detr/shapes."""
    params = json.dumps(generation_params(cfg), sort_keys=True)
    digest = hashlib.sha256(params.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse_detr" / "shapes"
    return Path(cfg.root or cache).expanduser() / digest


def shapes_paths(cfg, split: str) -> tuple[Path, Path]:
    """(images folder, annotation file) of a split, generating the whole data set first if needed."""
    folder = shapes_folder(cfg)
    if not (folder / "params.json").is_file():
        generate(cfg, folder)
    return folder / split, folder / "annotations" / f"instances_{split}.json"


def generate(cfg, folder: Path) -> None:
    """Write the data set into a temporary folder and rename it into place: readers never see half of it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating the shapes data set (%d + %d images) into %s", cfg.num_train, cfg.num_val, folder)
    start = time.perf_counter()
    tmp = temporary_name(folder)
    tmp.mkdir()  # as mkdir does, with the umask's permissions (mkdtemp's are 0700: unshareable)
    try:
        (tmp / "annotations").mkdir()
        for split, count in zip(SPLITS, (cfg.num_train, cfg.num_val)):
            (tmp / split).mkdir()
            coco = render_split(cfg, split, count, tmp / split)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        (tmp / "params.json").write_text(json.dumps(generation_params(cfg), indent=1))
        try:
            tmp.rename(folder)
        except OSError:                       # another process finished first; keep its copy
            if not (folder / "params.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated the shapes data set in %.1f s", time.perf_counter() - start)


def render_split(cfg, split: str, count: int, images_dir: Path) -> dict:
    """Draw a split (in parallel processes; the output does not depend on how it is split up) -> COCO dict."""
    chunks = [range(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    workers = min(os.cpu_count() or 1, MAX_WORKERS, len(chunks))
    args = (repeat(cfg), repeat(split), chunks, repeat(images_dir))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rendered = [image for part in pool.map(render_chunk, *args) for image in part]
    else:
        rendered = [image for part in map(render_chunk, *args) for image in part]
    images, annotations = [], []
    for index, (name, objects) in enumerate(rendered):
        images.append({"id": index + 1, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
        for category, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": category + 1,
                                "bbox": bbox, "area": area, "iscrowd": 0})
    categories = [{"id": k + 1, "name": SHAPE_NAMES[k], "supercategory": "shape"} for k in range(cfg.num_categories)]
    return {"images": images, "annotations": annotations, "categories": categories}


def render_chunk(cfg, split: str, indices: range, images_dir: Path) -> list:
    """Draw and save images `indices` of a split -> [(file name, objects)]."""
    out = []
    for index in indices:
        pixels, objects = render_image(np.random.default_rng([cfg.seed, SPLITS.index(split), index]), cfg)
        name = f"{index:06d}.png"
        Image.fromarray(pixels).save(images_dir / name, compress_level=1)
        out.append((name, [(category, mask_box(mask), int(mask.sum())) for category, mask in objects]))
    return out


def render_image(rng: np.random.Generator, cfg) -> tuple[np.ndarray, list]:
    """One image [S, S, 3] uint8 and its objects as (category index, bool [S, S] mask of its visible pixels)."""
    size = cfg.image_size
    image = background(rng, size)
    mean = image[::8, ::8].reshape(-1, 3).mean(0)
    placed = []                                           # (category, full mask, visible mask)
    for _ in range(rng.integers(cfg.min_objects, cfg.max_objects + 1)):
        category = int(rng.integers(cfg.num_categories))
        for _ in range(PLACEMENT_TRIES):
            mask = shape_mask(rng, SHAPE_NAMES[category], size, cfg.min_object_size, cfg.max_object_size)
            if all((visible & ~mask).sum() >= MIN_VISIBLE * full.sum() for _, full, visible in placed):
                break
        else:
            continue
        placed = [(c, full, visible & ~mask) for c, full, visible in placed] + [(category, mask, mask)]
        image[mask] = contrasting_colour(rng, mean)
    grain = rng.standard_normal((size // 2 + 1, size // 2 + 1, 3), dtype=np.float32) * rng.uniform(3.0, 12.0)
    pixels = np.clip(image + grain.repeat(2, 0).repeat(2, 1)[:size, :size], 0, 255).astype(np.uint8)
    return pixels, [(category, visible) for category, _, visible in placed]


def mask_box(mask: np.ndarray) -> list[int]:
    """The tight COCO box [x, y, w, h] of a mask's pixels (pixel edges: x + w is one past the last column)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 [S, S, 3] colour gradient or stripe texture, at a random angle."""
    angle = rng.uniform(0, np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    axis = np.arange(size, dtype=np.float32) / size
    ramp = cos * axis[None, :] + sin * axis[:, None]          # within [min(cos, 0), max(cos, 0) + sin]
    first = rng.uniform(0, 255, 3).astype(np.float32)
    second = np.clip(first + rng.uniform(-60, 60, 3), 0, 255).astype(np.float32)
    if rng.random() < 0.5:
        t = (ramp - min(cos, 0.0)) / (abs(cos) + sin)
    else:
        t = (((ramp + 1) * rng.uniform(6, 24)).astype(np.int32) & 1).astype(np.float32)  # ramp + 1 > 0
    return first + (second - first) * t[..., None]


def contrasting_colour(rng: np.random.Generator, mean: np.ndarray) -> np.ndarray:
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - mean) > 120:
            break
    return colour


def shape_mask(rng: np.random.Generator, shape: str, size: int, low: float, high: float) -> np.ndarray:
    """A bool [S, S] mask of one shape with random width, height and position, drawn without antialiasing."""
    w, h = rng.uniform(low, high, 2) * size
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    x1, y1 = x0 + w - 1, y0 + h - 1
    cx, cy, thick = (x0 + x1) / 2, (y0 + y1) / 2, max(2.0, min(w, h) / 3)
    canvas = Image.new("1", (size, size))
    draw = ImageDraw.Draw(canvas)
    if shape == "rectangle":
        draw.rectangle([x0, y0, x1, y1], fill=1)
    elif shape == "ellipse":
        draw.ellipse([x0, y0, x1, y1], fill=1)
    elif shape == "triangle":
        apex = x0 + rng.uniform(0.2, 0.8) * w
        base, tip = (y1, y0) if rng.random() < 0.5 else (y0, y1)
        draw.polygon([(x0, base), (x1, base), (apex, tip)], fill=1)
    elif shape == "cross":
        draw.rectangle([x0, cy - thick / 2, x1, cy + thick / 2], fill=1)
        draw.rectangle([cx - thick / 2, y0, cx + thick / 2, y1], fill=1)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=1)
    elif shape == "ring":
        draw.ellipse([x0, y0, x1, y1], outline=1, width=int(thick / 1.5) + 1)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPE_NAMES)}")
    return np.asarray(canvas, dtype=bool)
