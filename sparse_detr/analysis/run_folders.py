"""What a run folder holds, read back from local files only (no W&B needed).

A run folder is one that holds `eval_metrics.json` or `checkpoint.pth` (what `sparse-detr-train`
writes), next to `config.yaml`, `metrics.jsonl`, and `analysis/` once `sparse-detr-analyze` ran.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from omegaconf import OmegaConf

from sparse_detr.engine.checkpoint import CHECKPOINT_NAME, load_training_checkpoint
from sparse_detr.engine.trainer import METRICS_NAME as EVAL_METRICS_NAME
from sparse_detr.tracking import (ALPHA, EPOCH_METRIC, METRICS_FILE, PAIBB, SEGMENT, SPARSITY, STEP_METRIC,
                                  STEP_METRICS)

ANALYSIS_DIR = "analysis"
ANALYSIS_NAME = "analysis.json"
KEPT = (STEP_METRIC, EPOCH_METRIC, "time", SEGMENT)  # what every line of metrics.jsonl has besides its metrics


def is_run_folder(path: Path) -> bool:
    return (path / EVAL_METRICS_NAME).is_file() or (path / CHECKPOINT_NAME).is_file()


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


def read_metrics_log(run_dir: str | Path, prefixes: Sequence[str] | None = None) -> list[dict]:
    """The lines of `<run_dir>/metrics.jsonl` ([] when missing); a torn line is skipped.

    prefixes: keep only the metrics whose key starts with one of these (plus each line's axis and
    `time`), so that the long log of a real run stays small in memory.
    """
    path = Path(run_dir) / METRICS_FILE
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


def axis_of(key: str) -> str:
    """The x axis a metric key is logged against: `global_step` or `epoch` (tracking.STEP_METRICS)."""
    group = key.split("/", 1)[0]
    if group not in STEP_METRICS:
        raise KeyError(f"{key!r} is not a logged metric; groups: {', '.join(g + '/' for g in STEP_METRICS)}")
    return STEP_METRICS[group]


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(x, y) of one metric, sorted by x; a step logged twice (a resume) keeps its last value."""
    axis = axis_of(key)
    points = {row[axis]: row[key] for row in rows if key in row and axis in row}
    xs = sorted(points)
    return xs, [math.nan if points[x] is None else float(points[x]) for x in xs]


def last_logged(rows: list[dict], prefix: str) -> dict[str, float]:
    """The metrics under `prefix` of the last line that has any (e.g. `sparsity/`: the trainer logs
    all sites and layers of an evaluation in one line)."""
    for row in reversed(rows):
        values = {k: v for k, v in row.items() if k.startswith(prefix)}
        if values:
            return values
    return {}


def training_time_s(rows: list[dict]) -> float:
    """Seconds the run trained: per segment (one process, from its start of tracking to its last
    line), summed, so the waits between a stop and its resume do not count; NaN if empty.
    Lines without a segment (logs written before segments were recorded) count from the first."""
    spans: dict = {}
    for row in rows:
        if "time" in row:
            start, end = spans.get(row.get(SEGMENT), (row["time"], row["time"]))
            spans[row.get(SEGMENT)] = (min(start, row["time"]), max(end, row["time"]))
    return sum(end - (segment if segment is not None else start) for segment, (start, end) in spans.items()) \
        if spans else math.nan


def parse_site_key(key: str) -> tuple[str, int, str]:
    """`<group>/<site>/layer_<l>/<name>` -> (site, l, name), e.g. `alpha/cross/layer_1/head_3`."""
    _, site, layer, name = key.split("/")
    return site, int(layer.removeprefix("layer_")), name


def alpha_trajectories(rows: list[dict]) -> dict[str, list[tuple[int, list[float], list[float]]]]:
    """{site: [(layer, steps, [per head alpha series])...]} of the `alpha/...` keys in the log."""
    keys = sorted({k for row in rows for k in row if k.startswith(ALPHA + "/")}, key=parse_site_key)
    grouped: dict[str, dict[int, list]] = {}
    for key in keys:
        site, layer, _ = parse_site_key(key)
        steps, values = series(rows, key)
        grouped.setdefault(site, {}).setdefault(layer, [steps, []])[1].append(values)
    return {site: [(layer, steps, heads) for layer, (steps, heads) in sorted(layers.items())]
            for site, layers in grouped.items()}


def logged_sparsity(rows: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """{(site, layer): {metric: head mean}} of the last evaluation's `sparsity/...` metrics."""
    per_layer: dict[tuple[str, int], dict[str, float]] = {}
    for key, value in last_logged(rows, SPARSITY + "/").items():
        site, layer, metric = parse_site_key(key)
        per_layer.setdefault((site, layer), {})[metric] = value
    return per_layer


def logged_paibb(rows: list[dict]) -> float | None:
    """The head-mean PAIBB of all matched objects in the last decoder layer, at the last evaluation
    that logged PAIBB (what `sparse-detr-analyze` reports by default); None if none did."""
    means = {parse_site_key(k)[1]: v for k, v in last_logged(rows, f"{PAIBB}/all/").items() if k.endswith("/mean")}
    return means[max(means)] if means else None


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def run_config(run_dir: str | Path) -> dict:
    """The resolved config of a run: `config.yaml`, else the checkpoint's saved "config"."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").is_file():
        return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    if (run_dir / CHECKPOINT_NAME).is_file():
        return load_training_checkpoint(run_dir / CHECKPOINT_NAME).get("config") or {}
    return {}


def select(config: Mapping, dotted: str, default=None):
    """config["a"]["b"] for "a.b", or `default` where a part is missing."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node

