"""A trained model on images of one's own: batches of decoded images in, detections per image out.

Images go through the run's validation transforms (resize, normalise), are batched with
zero padding and an exact padding mask (as in training), and the post-processed boxes are
scaled back to each image's original pixels.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_detr.data.image_files import read_image
from sparse_detr.data.transforms import build_transforms
from sparse_detr.engine.progress import Progress
from sparse_detr.engine.trained_model import TrainedModel
from sparse_detr.viz.attention_maps import query_attention_maps


@dataclass
class ImagePrediction:
    path: Path
    image: torch.Tensor                 # [3, H, W] uint8, as read
    scores: torch.Tensor                # [K] of the kept detections, score >= threshold, best first
    labels: torch.Tensor                # [K]
    boxes: torch.Tensor                 # [K, 4] xyxy in the image's own pixels
    attention: np.ndarray | None        # [K, h, w] last decoder layer's cross-attention (head mean) per kept detection


def decoded(paths: Sequence[Path]) -> Iterator[tuple[Path, torch.Tensor]]:
    """(path, image) of each file that decodes; the others are skipped with a warning."""
    for path in paths:
        image = read_image(path)
        if image is not None:
            yield path, image


def batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def predict_images(trained: TrainedModel, paths: Sequence[Path], *, threshold: float, batch_size: int,
                   device, attention: bool = False, progress: str = "auto") -> Iterator[ImagePrediction]:
    """Run the model over the images in `paths` order, `batch_size` at a time."""
    transforms = build_transforms(trained.checked.data, train=False)
    bar = Progress(-(-len(paths) // batch_size), "predict", progress)
    for batch in batches(decoded(paths), batch_size):
        inputs = [transforms(image, {"boxes": torch.zeros(0, 4)})[0].to(device) for _, image in batch]
        outputs = trained.model(inputs, return_attention=attention)
        sizes = torch.tensor([list(image.shape[-2:]) for _, image in batch], device=device)
        results = trained.postprocessor({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, sizes)
        for index, ((path, image), result) in enumerate(zip(batch, results)):
            kept = torch.nonzero(result["scores"] >= threshold).flatten()
            kept = kept[result["scores"][kept].argsort(descending=True, stable=True)]
            maps = None
            if attention:
                maps = np.stack([query_attention_maps(outputs, int(q), index)[-1].mean(0) for q in kept]) \
                    if len(kept) else np.zeros((0, 1, 1))
            yield ImagePrediction(path, image, result["scores"][kept].cpu(), result["labels"][kept].cpu(),
                                  result["boxes"][kept].cpu(), maps)
        bar.update()
    bar.close()


def coco_results(prediction: ImagePrediction, categories: Sequence[dict], image_name: str) -> list[dict]:
    """COCO-style result rows of one image: image, category_id, category_name, bbox [x, y, w, h] pixels, score."""
    rows = []
    for score, label, (x0, y0, x1, y1) in zip(prediction.scores.tolist(), prediction.labels.tolist(),
                                              prediction.boxes.tolist()):
        category = categories[label]
        rows.append({"image": image_name, "category_id": category["id"], "category_name": category["name"],
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return rows
