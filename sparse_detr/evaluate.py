"""`sparse-detr-eval`: the COCO metrics of a trained checkpoint on a data split, as JSON, and
its confusion matrix (JSON and PNG).

    sparse-detr-eval checkpoint=outputs/runs/shapes_demo/softmax-none-tiny-shapes/seed_42
    sparse-detr-eval checkpoint=RUN/checkpoint.pth split=train output=/tmp/train_ap.json
    sparse-detr-eval checkpoint=RUN 'overrides=["data.root=/data/coco"]' device=cuda

The model is rebuilt from the config saved in the checkpoint (`overrides` change it first).
The confusion matrix goes beside the metrics file: `<metrics file stem>_confusion.{json,png}`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sparse_detr.checks import check_choice, check_range
from sparse_detr.config import ConfigError, config_dir, exit_on_bad_overrides, reports_config_errors, validate
from sparse_detr.data import SPLITS
from sparse_detr.run_folder import checkpoint_file, eval_split_path, write_json

IOU_THRESHOLD = 0.5  # a detection and a ground-truth box match in the confusion matrix from this IoU


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING            # a checkpoint.pth, or the run folder holding one
    split: str = "val"
    output: Optional[str] = None         # the JSON file; None: <run folder>/eval_<split>.json
    batch_size: Optional[int] = None     # None: the run's data.batch_size
    device: str = "auto"                 # auto (CUDA when visible) | cpu | cuda
    score_threshold: float = 0.5         # the confusion matrix counts detections scoring at least this
    overrides: List[str] = field(default_factory=list)  # changes to the run's config, e.g. [data.root=/data/coco]

    def __post_init__(self):
        self.checkpoint = checkpoint_file(self.checkpoint)
        check_choice("split", self.split, SPLITS)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_range("score_threshold", self.score_threshold, low=0.0, high=1.0)
        if self.batch_size is not None:
            check_range("batch_size", self.batch_size, low=1)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Validate, evaluate the checkpoint on the split, write and return the COCO metrics."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is required: sparse-detr-eval checkpoint=RUN_FOLDER[/checkpoint.pth]")
    args: EvaluateConfig = validate(cfg)
    from sparse_detr.data import evaluation_dataset  # heavy imports after the checks
    from sparse_detr.data.coco import category_table
    from sparse_detr.engine.distributed import choose_device
    from sparse_detr.engine.loop import evaluate
    from sparse_detr.engine.sampling import EpochSampler
    from sparse_detr.engine.trained_model import load_trained_model
    from sparse_detr.engine.trainer import make_loader
    from sparse_detr.metrics.coco_eval import CocoEvaluator
    from sparse_detr.metrics.confusion import confusion_matrix
    from sparse_detr.viz import save_figure
    from sparse_detr.viz.confusion import confusion_figure

    device = choose_device(args.device, 0)
    trained = load_trained_model(args.checkpoint, args.overrides, device, command="sparse-detr-eval")
    dataset = evaluation_dataset(trained.checked.data, args.split)
    loader = make_loader(dataset, args.batch_size or trained.cfg.data.batch_size, trained.cfg.data.num_workers,
                         EpochSampler(len(dataset), seed=0, shuffle=False), drop_last=False)
    evaluator = CocoEvaluator(dataset.coco, dataset.label_to_category)
    metrics = evaluate(trained.model, trained.postprocessor, loader, evaluator, device=device,
                       loop_cfg=trained.cfg.train)
    output = Path(args.output) if args.output else eval_split_path(Path(args.checkpoint).parent, args.split)
    write_json(output, {**metrics, "split": args.split, "epoch": trained.state.get("epoch"),
                        "global_step": trained.state.get("global_step")})
    matrix = confusion_matrix(dataset.coco, evaluator.detections(), dataset.label_to_category,
                              score_threshold=args.score_threshold, iou_threshold=IOU_THRESHOLD)
    names = [category["name"] for category in category_table(dataset)]
    confusion = output.with_name(f"{output.stem}_confusion")
    write_json(confusion.with_suffix(".json"), {
        "rows": "ground truth", "columns": "predicted", "classes": [*names, "background"],
        "category_ids": [*dataset.label_to_category, None], "iou_threshold": IOU_THRESHOLD,
        "score_threshold": args.score_threshold, "matrix": matrix.tolist()})
    title = f"{args.split}: IoU >= {IOU_THRESHOLD}, score >= {args.score_threshold}"
    save_figure(confusion_figure(matrix, names, title), confusion, ("png",))
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    print(f"metrics file: {output.resolve()}")
    print(f"confusion matrix: {confusion.with_suffix('.json').resolve()} (and .png)")
    return metrics


@hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> None:
    evaluate_checkpoint(cfg)


def main() -> None:
    exit_on_bad_overrides("evaluate", sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
