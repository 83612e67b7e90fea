"""`sparse-detr-predict`: a trained checkpoint on your own images: detections as COCO-style JSON
and one PNG per image.

    sparse-detr-predict checkpoint=outputs/runs/shapes_demo/softmax-none-tiny-shapes/seed_42 input=photos/
    sparse-detr-predict checkpoint=RUN/checkpoint.pth input=cat.jpg output=/tmp/pred threshold=0.3 attention=true

The model is rebuilt from the config saved in the checkpoint and names its classes from the data
set it was trained on. Writes `predictions.json` and `<image file>.detections.png` (with
`attention=true` also `<image file>.attention.png`) into `output` (default
`<run folder>/predictions`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sparse_detr.checks import check_choice, check_range
from sparse_detr.config import ConfigError, config_dir, reports_config_errors, validate
from sparse_detr.data.image_files import input_files
from sparse_detr.run_folder import checkpoint_file, write_json

PREDICTIONS_NAME = "predictions.json"


@dataclass
class PredictConfig:
    checkpoint: str = MISSING            # a checkpoint.pth, or the run folder holding one
    input: str = MISSING                 # an image, or a folder of images (its files, not subfolders)
    output: Optional[str] = None         # the folder to write; None: <run folder>/predictions
    threshold: float = 0.5               # detections with a score at or above this are kept
    device: str = "auto"                 # auto (CUDA when visible) | cpu | cuda
    batch_size: int = 4                  # images per forward pass (padded to the largest)
    attention: bool = False              # also draw each kept detection's cross-attention map
    progress: str = "auto"               # auto (a bar on a terminal only) | on | off
    overrides: List[str] = field(default_factory=list)  # changes to the run's config, e.g. [data.val_size=800]

    def __post_init__(self):
        self.checkpoint = checkpoint_file(self.checkpoint)
        check_range("threshold", self.threshold, low=0.0, high=1.0)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_range("batch_size", self.batch_size, low=1)
        check_choice("progress", self.progress, ("auto", "on", "off"))
        try:
            input_files(self.input)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"input={self.input!r}: {error}") from error


ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


def predict(cfg: DictConfig) -> Path:
    """Validate, run the model over the images, write the JSON and the figures; returns the JSON file."""
    for key in ("checkpoint", "input"):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key} is required: sparse-detr-predict checkpoint=RUN_FOLDER input=IMAGE_OR_FOLDER")
    args: PredictConfig = validate(cfg)
    # heavy imports after the config is known good
    from sparse_detr.engine.distributed import choose_device
    from sparse_detr.engine.prediction import coco_results, predict_images
    from sparse_detr.engine.trained_model import load_trained_model
    from sparse_detr.viz import save_figure
    from sparse_detr.viz.predictions import captions, detection_attention_figure, prediction_figure

    device = choose_device(args.device, 0)
    trained = load_trained_model(args.checkpoint, args.overrides, device, command="sparse-detr-predict")
    names = [category["name"] for category in trained.categories]
    out = Path(args.output) if args.output else Path(args.checkpoint).parent / "predictions"
    paths = input_files(args.input)
    rows, images = [], 0
    for prediction in predict_images(trained, paths, threshold=args.threshold, batch_size=args.batch_size,
                                     device=device, attention=args.attention, progress=args.progress):
        name = prediction.path.name
        rows.extend(coco_results(prediction, trained.categories, name))
        picture = prediction.image.permute(1, 2, 0).numpy() / 255.0
        boxes = prediction.boxes.tolist()
        texts = captions(prediction.scores.tolist(), prediction.labels.tolist(), names)
        title = f"{name}: {len(boxes)} detections with score >= {args.threshold}"
        save_figure(prediction_figure(picture, boxes, texts, title), out / f"{name}.detections", ("png",))
        if args.attention:
            save_figure(detection_attention_figure(picture, prediction.attention, boxes, texts),
                        out / f"{name}.attention", ("png",))
        images += 1
    if images == 0:
        raise ConfigError(f"input={args.input!r}: none of its {len(paths)} files is a readable image")
    write_json(out / PREDICTIONS_NAME, rows)
    print(f"{len(rows)} detections in {images} images; predictions: {(out / PREDICTIONS_NAME).resolve()}")
    return out / PREDICTIONS_NAME


@hydra.main(config_path=str(config_dir() / "predict"), config_name="predict", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
