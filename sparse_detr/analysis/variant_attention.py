"""The cross-attention that each variant's model gives one ground-truth object of one validation
image: the figure the thesis drew by hand, one column per variant, one row per decoder layer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_convert

from sparse_detr.engine.trained_model import load_trained_model
from sparse_detr.run_folder import checkpoint_file
from sparse_detr.data import evaluation_dataset
from sparse_detr.errors import ConfigError
from sparse_detr.viz.attention_maps import denormalize, query_attention_maps


@torch.no_grad()
def object_attention(run_dir: str | Path, image_index: int, object_index: int, device: str = "cpu"
                     ) -> tuple[np.ndarray, list[float], np.ndarray]:
    """(picture [H, W, 3], the object's box xyxy in its pixels, maps [layers, h, w]) of the run's
    final model: the head-averaged cross-attention of the query that the Hungarian matcher assigns
    to ground-truth object `object_index` of validation image `image_index` (run alone)."""
    trained = load_trained_model(checkpoint_file(str(run_dir)), device=device, command="sparse-detr-report")
    dataset = evaluation_dataset(trained.cfg.data, "val")
    if not 0 <= image_index < len(dataset):
        raise ConfigError(f"attention_image={image_index} is out of range; valid: [0, {len(dataset) - 1}]")
    image, target = dataset[image_index]
    objects = len(target["labels"])
    if not 0 <= object_index < objects:
        raise ConfigError(f"attention_object={object_index} is out of range; validation image "
                          f"{image_index} has {objects} objects")
    target = {key: value.to(device) for key, value in target.items()}
    outputs = trained.model([image.to(device)], return_attention=True)
    (queries, truths), = trained.criterion.matcher(outputs, [target])
    query = int(queries[truths.tolist().index(object_index)])
    height, width = target["size"].tolist()
    box = (box_convert(target["boxes"][object_index], "cxcywh", "xyxy") * torch.tensor([width, height] * 2,
                                                                                        device=device)).tolist()
    return denormalize(image)[:height, :width], box, query_attention_maps(outputs, query).mean(1)
