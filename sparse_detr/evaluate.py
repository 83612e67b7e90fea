"""`sparse-detr-eval`: the COCO metrics of a trained checkpoint on a data split, as JSON.

    sparse-detr-eval checkpoint=outputs/runs/shapes_demo/softmax-none-tiny-shapes/seed_42
    sparse-detr-eval checkpoint=RUN/checkpoint.pth split=train output=/tmp/train_ap.json
    sparse-detr-eval checkpoint=RUN 'overrides=[data.root=/data/coco]' device=cuda

The model is rebuilt from the config saved in the checkpoint (`overrides` change it first).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sparse_detr.config import (ConfigError, check_choice, check_range, checkpoint_file, config_dir,
                                reports_config_errors, validate)
from sparse_detr.data import SPLITS


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING            # a checkpoint.pth, or the run folder holding one
    split: str = "val"
    output: Optional[str] = None         # the JSON file; None: <run folder>/eval_<split>.json
    batch_size: Optional[int] = None     # None: the run's data.batch_size
    device: str = "auto"                 # auto (CUDA when visible) | cpu | cuda
    overrides: List[str] = field(default_factory=list)  # changes to the run's config, e.g. [data.root=/data/coco]

    def __post_init__(self):
        self.checkpoint = checkpoint_file(self.checkpoint)
        check_choice("split", self.split, SPLITS)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if self.batch_size is not None:
            check_range("batch_size", self.batch_size, low=1)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Validate, evaluate the checkpoint on the split, write and return the COCO metrics."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is required: sparse-detr-eval checkpoint=RUN_FOLDER[/checkpoint.pth]")
    args: EvaluateConfig = validate(cfg)
    from sparse_detr.data import evaluation_dataset  # heavy imports after the checks
    from sparse_detr.engine.distributed import choose_device
    from sparse_detr.engine.loop import evaluate
    from sparse_detr.engine.sampling import EpochSampler
    from sparse_detr.engine.trained_model import load_trained_model
    from sparse_detr.engine.trainer import make_loader
    from sparse_detr.metrics.coco_eval import CocoEvaluator, write_metrics_json

    device = choose_device(args.device, 0)
    trained = load_trained_model(args.checkpoint, args.overrides, device)
    dataset = evaluation_dataset(trained.cfg.data, args.split)
    loader = make_loader(dataset, args.batch_size or trained.cfg.data.batch_size, trained.cfg.data.num_workers,
                         EpochSampler(len(dataset), seed=0, shuffle=False), drop_last=False)
    metrics = evaluate(trained.model, trained.postprocessor, loader,
                       CocoEvaluator(dataset.coco, dataset.label_to_category), device=device, loop_cfg=trained.cfg.train)
    output = Path(args.output) if args.output else Path(args.checkpoint).parent / f"eval_{args.split}.json"
    write_metrics_json({**metrics, "split": args.split, "epoch": trained.state.get("epoch"),
                        "global_step": trained.state.get("global_step")}, output)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    print(f"metrics file: {output.resolve()}")
    return metrics


@hydra.main(config_path=str(config_dir()), config_name="evaluate", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> None:
    evaluate_checkpoint(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
