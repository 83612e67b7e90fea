"""A training job's last stage (`train.analyze_at_end=true`): analyse its own final checkpoint.

`sparse-detr-study` asks every training run for it, so a run is trained and analysed by one job,
on SLURM as on this machine, with no second job to schedule. The analysis overrides are checked
with the rest of the training config, before anything starts; a requeued or restarted job whose
analysis was already made from the final checkpoint does not make it again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig

from sparse_detr.config import ConfigError, TrainConfig, hydra_first_line, load_config, validate
from sparse_detr.run_folder import analysis_dir, analysis_is_current

SET_BY_THE_RUN = ("checkpoint", "output_dir")   # the run's own checkpoint, and <run folder>/analysis


def analysis_config(run_dir: str | Path, overrides: Sequence[str]) -> DictConfig:
    """The `sparse-detr-analyze` config for the checkpoint in `run_dir`: its defaults and `overrides`."""
    import sparse_detr.analyze  # noqa: F401  (registers the analyze schema)

    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in SET_BY_THE_RUN:
            raise ConfigError(f"train.analyze_overrides: {override!r} sets {key}, which the run sets itself "
                              f"(its own checkpoint, written into <run folder>/analysis); leave it out")
    try:
        cfg = load_config(list(overrides), "analyze")
    except Exception as error:  # a misspelt key or a malformed value: Hydra's words
        raise ConfigError(f"train.analyze_overrides={list(overrides)}: {hydra_first_line(error)}") from None
    cfg.checkpoint = str(run_dir)  # (set here, not as an override: a run folder's name may hold `=` and `,`)
    return cfg


def check_analysis(checked: TrainConfig, run_dir: str | Path) -> None:
    """When the run analyses itself at the end, its analysis overrides must be valid now."""
    if checked.train.analyze_at_end:
        try:
            validate(analysis_config(run_dir, checked.train.analyze_overrides))
        except ConfigError as error:
            message = str(error)
            raise ConfigError(message if message.startswith("train.") else f"train.analyze_overrides: {message}") \
                from None


def analyze_finished_run(run_dir: str | Path, overrides: Sequence[str]) -> Optional[Path]:
    """Analyse the run folder's checkpoint into `<run folder>/analysis`, unless that analysis is
    already of this checkpoint; returns the analysis folder it wrote, else None."""
    if analysis_is_current(Path(run_dir)):
        print(f"analysis of the final checkpoint already in {analysis_dir(run_dir)}")
        return None
    from sparse_detr.analyze import analyze

    return analyze(analysis_config(run_dir, overrides))
