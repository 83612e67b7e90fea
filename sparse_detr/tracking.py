"""Experiment tracking: one small interface, two backends (`wandb`, `none`), chosen by `logger=`.

Every run writes its metrics as JSON lines to `<run_dir>/metrics.jsonl` (`run_folder` owns the file
and reads it back), whatever the backend, so analysis and reports never need the W&B servers. Only rank 0 tracks; other ranks get a no-op.

    tracker = build_tracker(cfg.logger, run_dir, config_dict, run_id=ckpt.get("tracker_run_id"), rank=rank)
    tracker.log({"train-main-metrics/loss": 0.7, "alpha/cross/layer_0/head_3": 1.41}, step=global_step)
    tracker.log_epoch({"val-epoch-metrics/AP": 0.31}, epoch=epoch)
    checkpoint["tracker_run_id"] = tracker.run_id   # resume continues the same W&B run
    tracker.finish()

Metric keys are `<group>/<name>`; each group has one x axis (its step metric):

    train-main-metrics/        global_step  weighted losses: loss, loss_ce, loss_bbox, loss_giou, ...
    train-metrics/             global_step  unscaled losses, per decoder layer
    train-extra-metrics/       global_step  lr per param group, iteration/data time, memory
    alpha/<site>/layer_<l>/head_<h>   global_step  learned alpha: a parameter that moves every step
    lambda/<site>/layer_<l>/head_<h>  global_step  learned TVMax lambda, likewise (LEARNED_GROUPS)
    sparsity/                  global_step  attention sparsity, logged at the global step it was
                                            measured (training batches or an evaluation), so it
                                            lines up with the loss and alpha curves
    train-epoch-main-metrics/  epoch        epoch averages of the weighted losses
    val-epoch-metrics/         epoch        COCO AP ... (sparsity per epoch can go here too)

`global_step` is one counter over the whole run (saved in checkpoints by the training code), so
charts line up across resumes and processes. W&B's own `_step` is not used as an x axis.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from sparse_detr.checks import check_choice
from sparse_detr.run_folder import EPOCH_METRIC, METRICS_LOG_NAME, SEGMENT, STEP_METRIC, TIME, open_metrics_log

log = logging.getLogger(__name__)

LOGGER_NAMES = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
_LEGACY_MODES = {"run": "online", "dryrun": "offline"}   # older spellings of WANDB_MODE

TRAIN_MAIN = "train-main-metrics"
TRAIN = "train-metrics"
TRAIN_EXTRA = "train-extra-metrics"
TRAIN_EPOCH_MAIN = "train-epoch-main-metrics"
VAL_EPOCH = "val-epoch-metrics"
ALPHA = "alpha"
LAMBDA = "lambda"
# What mappings learn per head (`AttentionMapping.learned_names`), each its own group of series
LEARNED_GROUPS = (ALPHA, LAMBDA)
SPARSITY = "sparsity"
PAIBB = "paibb"       # by object size, every validation pass (sparse_detr/metrics/paibb_sizes.py)

# metric group -> the step metric its series are charted against
STEP_METRICS = {
    TRAIN_MAIN: STEP_METRIC,
    TRAIN: STEP_METRIC,
    TRAIN_EXTRA: STEP_METRIC,
    **{group: STEP_METRIC for group in LEARNED_GROUPS},
    SPARSITY: STEP_METRIC,
    PAIBB: STEP_METRIC,
    TRAIN_EPOCH_MAIN: EPOCH_METRIC,
    VAL_EPOCH: EPOCH_METRIC,
}

REDACTED = "<redacted>"
SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "credential")


@dataclass
class LoggerConfig:
    """Where metrics go besides `metrics.jsonl`. The W&B fields are ignored by `name: none`."""
    name: str = "none"                # none | wandb
    project: str = "sparse-detr"
    entity: Optional[str] = None      # W&B user or team; None: the account's default
    group: Optional[str] = None       # the variant without the seed, so seeds aggregate
    run_name: Optional[str] = None
    tags: List[str] = field(default_factory=list)   # sweep name and the chosen config groups
    mode: Optional[str] = None        # online | offline | disabled; None: $WANDB_MODE, else offline
    dir: Optional[str] = None         # parent of the `wandb/` folder; None: $WANDB_DIR, else the run folder

    def __post_init__(self):
        check_choice("logger.name", self.name, LOGGER_NAMES)
        if self.mode is not None:
            check_choice("logger.mode", self.mode, WANDB_MODES)


def axis_of(key: str) -> str:
    """The x axis a metric key is logged against: `global_step` or `epoch` (STEP_METRICS)."""
    group = key.split("/", 1)[0]
    if group not in STEP_METRICS:
        raise KeyError(f"{key!r} is not a logged metric; groups: {', '.join(g + '/' for g in STEP_METRICS)}")
    return STEP_METRICS[group]


def learned_key(name: str, site: str, layer: int, head: int) -> str:
    """The series of one head's learned mapping parameter `name` (a LEARNED_GROUPS entry):
    `<name>/<site>/layer_<l>/head_<h>`, e.g. `alpha/cross/layer_0/head_3`."""
    return f"{name}/{site}/layer_{layer}/head_{head}"


def resolve_mode(mode: Optional[str]) -> str:
    """The W&B mode: `mode` if set, else $WANDB_MODE, else offline (never needs a network)."""
    if mode is not None:
        check_choice("logger.mode", mode, WANDB_MODES)
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return "offline"
    env = _LEGACY_MODES.get(env, env)
    check_choice("WANDB_MODE", env, WANDB_MODES)
    return env


def looks_secret(key: str) -> bool:
    """Whether a config key (`api_key`, `logger.wandb_token`, ...) names a secret: it contains
    *key*, *token*, *secret*, *password*, *passwd* or *credential*."""
    return any(word in str(key).lower() for word in SECRET_WORDS)


def scrub_secrets(config: Any) -> Any:
    """A copy of `config` whose values under keys naming a secret (`looks_secret`) are replaced
    by "<redacted>", at any depth."""
    if isinstance(config, Mapping):
        return {k: REDACTED if looks_secret(k) else scrub_secrets(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [scrub_secrets(v) for v in config]
    return config


def new_run_id() -> str:
    """A W&B-compatible run id: 8 characters of [a-z0-9]."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _number(value: Any) -> float | int:
    if hasattr(value, "item"):        # torch / numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric values must be numbers, got {type(value).__name__}: {value!r}")
    return value


class Tracker:
    """The `none` backend, and the base of the others: appends every call to `metrics.jsonl`.

    Each line is one call: `{"global_step": s, "time": t, "segment": t0, "<group>/<name>": v, ...}`
    from `log`, or `{"epoch": e, "time": t, "segment": t0, ...}` from `log_epoch`; `segment` is the
    time this process started tracking, so the time a run trained is the sum over its segments,
    not counting the waits between a stop and its resume. After a resume from an older checkpoint
    a step can appear twice; readers keep the last line for it.
    """
    backend = "none"

    def __init__(self, run_dir: str | os.PathLike, run_id: Optional[str] = None):
        self.run_id: str = run_id or new_run_id()
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_LOG_NAME
        self.segment = round(time.time(), 3)
        self._file = open_metrics_log(self.run_dir)

    def log(self, metrics: Mapping[str, Any], *, step: int) -> None:
        """Log `train-*`, `alpha/` or `sparsity/` metrics at `global_step = step`."""
        self._record(STEP_METRIC, int(step), metrics)

    def log_epoch(self, metrics: Mapping[str, Any], *, epoch: int) -> None:
        """Log `*-epoch-*` metrics of epoch `epoch`."""
        self._record(EPOCH_METRIC, int(epoch), metrics)

    def finish(self, exit_code: int = 0) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def _record(self, axis: str, value: int, metrics: Mapping[str, Any]) -> None:
        row = {axis: value}
        for key, metric in metrics.items():
            group = key.split("/", 1)[0]
            if STEP_METRICS.get(group) != axis or "/" not in key:
                call = "log(..., step=)" if axis == STEP_METRIC else "log_epoch(..., epoch=)"
                valid = [g for g, a in STEP_METRICS.items() if a == axis]
                raise ValueError(f"metric {key!r} cannot go through {call}; its key must start with "
                                 f"one of: {', '.join(g + '/' for g in valid)}")
            row[key] = _number(metric)
        self._file.write(json.dumps({**row, TIME: round(time.time(), 3), SEGMENT: self.segment}) + "\n")
        self._send(row)

    def _send(self, row: dict) -> None:
        """Hand a row to the backend (none here)."""


class NullTracker(Tracker):
    """What ranks other than 0 get: every call does nothing and no file is written."""
    backend = "noop"

    def __init__(self, run_id: Optional[str] = None):
        self.run_id = run_id or ""

    def log(self, metrics, *, step):
        pass

    def log_epoch(self, metrics, *, epoch):
        pass

    def finish(self, exit_code: int = 0):
        pass


class WandbTracker(Tracker):
    """Weights & Biases, plus `metrics.jsonl`. Resumes the run `run_id` (resume="allow")."""
    backend = "wandb"

    def __init__(self, cfg: LoggerConfig, run_dir, config: Mapping[str, Any], run_id: Optional[str] = None):
        import wandb

        self.mode = resolve_mode(cfg.mode)
        super().__init__(run_dir, run_id)
        root = Path(cfg.dir or os.environ.get("WANDB_DIR") or run_dir)
        root.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.run_name,
                tags=list(cfg.tags) or None, config=scrub_secrets(config), dir=str(root),
                id=self.run_id, resume="allow", mode=self.mode,
            )
        except BaseException:
            self._file.close()
            raise
        define_metrics(self.run)
        if self.mode == "offline":
            runs = Path(self.run.dir).parent.parent
            log.info("W&B run %s is offline; upload it later with: wandb sync %s/offline-run-*-%s",
                     self.run_id, runs, self.run_id)

    def _send(self, row: dict) -> None:
        # Our own axis keys instead of `step=`: W&B's `_step` restarts in resumed offline runs.
        self.run.log(row)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run and stop W&B's service process: only then is the offline run file
        complete on disk (wandb-core writes it asynchronously after `run.finish()` returns)."""
        if not self._file.closed:
            import wandb

            self.run.finish(exit_code=exit_code)
            wandb.teardown()
        super().finish(exit_code)


def define_metrics(run) -> None:
    """Chart every group against its step metric (`STEP_METRICS`)."""
    run.define_metric(STEP_METRIC)
    run.define_metric(EPOCH_METRIC)
    for group, axis in STEP_METRICS.items():
        run.define_metric(f"{group}/*", step_metric=axis)


def build_tracker(cfg: LoggerConfig, run_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
                  *, run_id: Optional[str] = None, rank: int = 0) -> Tracker:
    """The tracker `cfg.name` selects, for rank 0; a no-op for other ranks.

    config: the resolved run config (dict or DictConfig) to log to W&B, secrets scrubbed.
    run_id: the id saved in the checkpoint, to continue the same W&B run; None starts a new one.
    """
    if rank != 0:
        return NullTracker(run_id)
    check_choice("logger.name", cfg.name, LOGGER_NAMES)
    if cfg.name == "none":
        return Tracker(run_dir, run_id)
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    return WandbTracker(cfg, run_dir, config or {}, run_id)
