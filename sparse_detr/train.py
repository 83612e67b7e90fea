"""`sparse-detr-train`: train DETR with the attention mappings and placement the config chooses.

    sparse-detr-train                                   # the CPU demo on the built-in shapes data
    sparse-detr-train attention=entmax15 placement=cross
    sparse-detr-train -m attention=softmax,sparsemax placement=encoder,cross
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sparse_detr import naming
from sparse_detr.config import config_dir, exit_on_bad_overrides, reports_config_errors, validate_run
from sparse_detr.final_analysis import analyze_finished_run, check_analysis
from sparse_detr.openmp import shorten_spin_waits
from sparse_detr.run_folder import record_start


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)


def variant_name(cfg: DictConfig) -> str:
    """attention-placement-backbone-data[+other overrides]: what the run folder is named after."""
    if not HydraConfig.initialized():
        return naming.variant_name(cfg)
    hydra_cfg = HydraConfig.get()
    return naming.variant_name(cfg, list(hydra_cfg.overrides.task),
                               list(hydra_cfg.job.config.override_dirname.exclude_keys))


def name_tracking_run(cfg: DictConfig) -> None:
    """W&B group = the variant (seeds aggregate), name = variant/seed, tags = the chosen groups;
    values given in the config are kept."""
    logger, variant = cfg.logger, variant_name(cfg)
    logger.group = logger.group or variant
    logger.run_name = logger.run_name or f"{variant}/seed_{cfg.seed}"
    if not logger.tags:
        experiment = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
        attention, placement = naming.attention_and_placement(cfg)
        logger.tags = [t for t in (experiment, attention, f"placement={placement}", cfg.backbone.name,
                                   naming.data_label(cfg)) if t]


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, then run (or resume) the training in its run folder; returns the final COCO metrics.

    The run folder is locked for the whole run (`engine.run_lock`): a second start of the same
    run stops before it writes anything. With `train.analyze_at_end`, the run ends by analysing its
    final checkpoint (`final_analysis`), still holding the folder."""
    run_dir = run_dir_of(cfg)
    checked = validate_run(cfg, run_dir)
    check_analysis(checked, run_dir)
    from sparse_detr.engine import distributed  # heavy imports after the config is known good
    from sparse_detr.engine.run_lock import hold_run_folder
    from sparse_detr.engine.trainer import Trainer

    ctx = distributed.setup(cfg.train.device)
    with hold_run_folder(run_dir, ctx):
        name_tracking_run(cfg)
        if ctx.is_main:
            record_start(run_dir, cfg, sys.argv)
        trainer = Trainer(cfg, run_dir, checked)
        try:
            metrics = trainer.fit()
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped training is the one to report
                trainer.close(exit_code=1)
            raise
        trainer.close()
        if ctx.is_main and checked.train.analyze_at_end:
            analyze_finished_run(run_dir, checked.train.analyze_overrides)
    if ctx.is_main:
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=None))
        print(f"run folder: {run_dir.resolve()}")
    return metrics


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> float | None:
    return train(cfg).get("AP")


def main() -> None:
    shorten_spin_waits()  # before the first import of torch
    exit_on_bad_overrides("train", sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
