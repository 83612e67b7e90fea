"""The run folder: the name of every file the programs write there, and their readers and writers.

    <run folder>/
        checkpoint.pth        the run's own checkpoint: a start in this folder resumes from it
        checkpoint.prev.pth   the checkpoint it replaced, for when the newest turns out unreadable
        run.lock              held by the process group training here (engine/run_lock.py)
        config.yaml           the resolved config of the last start
        command.txt           every command line that started the run, one a line
        metrics.jsonl         one JSON line per tracker call (tracking.py), whatever the backend
        eval_metrics.json     COCO metrics of the last evaluation during training
        eval_<split>.json     COCO metrics written by sparse-detr-eval
        analysis/             sparse-detr-analyze: analysis.json, tables and figures

This module is the one owner of that layout; the trainer, tracking, evaluation, analysis, the
sweep status and the benchmarks all go through it. No torch here (reading a report config or a
sweep's status must stay light): the checkpoint files are written and read by
`engine/checkpoint.py` at the paths named here; `read_checkpoint_state` imports torch when called.
"""
from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Optional

from omegaconf import DictConfig, OmegaConf

from sparse_detr.atomic_files import write_atomically
from sparse_detr.errors import ConfigError

CHECKPOINT_NAME = "checkpoint.pth"
PREVIOUS_CHECKPOINT_NAME = "checkpoint.prev.pth"
LOCK_NAME = "run.lock"
CONFIG_NAME = "config.yaml"
COMMAND_NAME = "command.txt"
METRICS_LOG_NAME = "metrics.jsonl"
EVAL_METRICS_NAME = "eval_metrics.json"
ANALYSIS_DIR = "analysis"
ANALYSIS_NAME = "analysis.json"
PROVENANCE_NAME = "provenance.json"

# Every line of metrics.jsonl has its axis (one of the two), the time it was written and its
# segment: the time the process that wrote it started tracking.
STEP_METRIC = "global_step"
EPOCH_METRIC = "epoch"
TIME = "time"
SEGMENT = "segment"
KEPT = (STEP_METRIC, EPOCH_METRIC, TIME, SEGMENT)


# ---------------------------------------------------------------------------------------------
# paths

def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def previous_checkpoint(path: str | Path) -> Path:
    """`checkpoint.prev.pth` beside a run folder's `checkpoint.pth`."""
    return Path(path).with_name(PREVIOUS_CHECKPOINT_NAME)


def eval_split_path(run_dir: str | Path, split: str) -> Path:
    """Where `sparse-detr-eval` writes the metrics of `split`: `eval_<split>.json`."""
    return Path(run_dir) / f"eval_{split}.json"


def analysis_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ANALYSIS_DIR


def checkpoint_file(path: str) -> str:
    """A checkpoint given as the file or as the run folder holding `checkpoint.pth`."""
    resolved = Path(path).expanduser()
    if resolved.is_dir():
        resolved = checkpoint_path(resolved)
    if not resolved.is_file():
        raise ConfigError(f"checkpoint={path!r}: no such file (give a checkpoint.pth or its run folder)")
    return str(resolved)


def is_run_folder(path: Path) -> bool:
    """What `sparse-detr-train` leaves: `eval_metrics.json` once evaluated, `checkpoint.pth` once saved."""
    return (path / EVAL_METRICS_NAME).is_file() or checkpoint_path(path).is_file()


def find_run_folders(paths: Iterable[str | Path]) -> list[Path]:
    """Every run folder at or below `paths` (resolved, sorted, each once); a run folder's own
    subfolders are not searched. Raises FileNotFoundError for a path that is not a folder."""
    found, seen = set(), set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r}: no such folder")
        pending = [path.resolve()]
        while pending:
            folder = pending.pop()
            if folder in seen:  # reached again through a symlink
                continue
            seen.add(folder)
            if is_run_folder(folder):
                found.add(folder)
            else:
                pending.extend(child.resolve() for child in folder.iterdir() if child.is_dir())
    return sorted(found)


def newest_mtime(run_dir: Path) -> Optional[float]:
    """When the run last wrote one of its files (None: none yet)."""
    times = []
    for name in (METRICS_LOG_NAME, CHECKPOINT_NAME, EVAL_METRICS_NAME, CONFIG_NAME):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            pass
    return max(times) if times else None


# ---------------------------------------------------------------------------------------------
# writers

def json_safe(value):
    """NaN and infinities -> None, at any depth; tuples -> lists; other values unchanged."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data) -> Path:
    """Strict JSON (NaN -> null), atomically: a reader (a report collecting a sweep, a requeued
    job) never sees half a file, and it gets the umask's permissions (`atomic_files`)."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda handle: handle.write(text), binary=False)
    return path


def record_start(run_dir: Path, cfg: DictConfig, argv: Sequence[str]) -> None:
    """The resolved config, and the exact command line (appended: a resumed run adds a line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / CONFIG_NAME, resolve=True)
    with open(run_dir / COMMAND_NAME, "a", encoding="utf-8") as handle:
        handle.write(shlex.join([Path(argv[0]).name, *argv[1:]]) + "\n")


def open_metrics_log(run_dir: Path) -> IO[str]:
    """`metrics.jsonl` for appending, line-buffered, so a kill loses at most the line being written."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return open(run_dir / METRICS_LOG_NAME, "a", encoding="utf-8", buffering=1)


# ---------------------------------------------------------------------------------------------
# readers

def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when there is no such file."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_config(run_dir: Path) -> Optional[DictConfig]:
    """`config.yaml` of a run (None when missing or unreadable)."""
    try:
        return OmegaConf.load(Path(run_dir) / CONFIG_NAME)
    except Exception:  # missing, or being replaced right now
        return None


def read_metrics_log(run_dir: str | Path, prefixes: Sequence[str] | None = None) -> list[dict]:
    """The lines of `<run_dir>/metrics.jsonl` ([] when missing); a torn line is skipped.

    prefixes: keep only the metrics whose key starts with one of these (plus each line's axis,
    time and segment), so that the long log of a real run stays small in memory.
    """
    path = Path(run_dir) / METRICS_LOG_NAME
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if prefixes is not None:
                row = {k: v for k, v in row.items() if k in KEPT or k.startswith(tuple(prefixes))}
            rows.append(row)
    return rows


def read_checkpoint_state(path: Path) -> Optional[dict]:
    """`state` of a training checkpoint (epoch, global_step, ...) without reading its tensors;
    None when missing, being replaced right now, or not a checkpoint."""
    if not Path(path).is_file():
        return None
    try:
        import torch  # only here: a status without checkpoints needs no torch

        return dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state"])
    except Exception:
        return None


def read_eval_metrics(run_dir: Path) -> Optional[dict]:
    """`eval_metrics.json`, or None when missing or being replaced right now."""
    try:
        return read_json(Path(run_dir) / EVAL_METRICS_NAME)
    except (OSError, ValueError):
        return None


def training_finished(run_dir: Path, cfg: Optional[DictConfig] = None) -> bool:
    """Whether the run's latest evaluation is of its last epoch (or its step limit): a finished training."""
    cfg = read_config(run_dir) if cfg is None else cfg
    metrics = read_eval_metrics(run_dir)
    if not metrics or cfg is None:
        return False
    epochs = OmegaConf.select(cfg, "schedule.epochs")
    max_steps = OmegaConf.select(cfg, "train.max_steps")
    return ((epochs is not None and metrics.get("epoch") == epochs)
            or (max_steps is not None and (metrics.get("global_step") or 0) >= max_steps))


def analysis_is_current(run_dir: Path) -> bool:
    """Whether `analysis/analysis.json` was made from the checkpoint the run folder holds now."""
    try:
        analysis = read_json(analysis_dir(run_dir) / ANALYSIS_NAME)
    except (OSError, ValueError):
        return False
    state = read_checkpoint_state(checkpoint_path(run_dir))
    return bool(analysis) and state is not None and analysis.get("global_step") == state.get("global_step")


def run_folder_in_use(run_dir: Path) -> bool:
    """Whether a live process holds the run folder's lock (`engine/run_lock.py`): training or
    analysing there now. (A probe: it holds the lock for no longer than the test takes.)"""
    import fcntl

    try:
        with open(Path(run_dir) / LOCK_NAME, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False
