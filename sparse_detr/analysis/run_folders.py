"""What a run folder's files say, for analysis and reports: metric series, training time, alphas,
logged sparsity, the run's config. Local files only (no W&B needed); the folder's layout and its
file readers are `sparse_detr.run_folder`'s."""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.run_folder import SEGMENT, checkpoint_path, read_config
from sparse_detr.tracking import ALPHA, PAIBB, SPARSITY, axis_of


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


def alpha_trajectories(rows: list[dict], group: str = ALPHA) -> dict[str, list[tuple[int, list[float], list[float]]]]:
    """{site: [(layer, steps, [per head series])...]} of the `<group>/...` keys in the log: the
    learned alphas, or another learned mapping parameter (`tracking.LEARNED_GROUPS`)."""
    keys = sorted({k for row in rows for k in row if k.startswith(group + "/")}, key=parse_site_key)
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



def run_config(run_dir: str | Path) -> dict:
    """The resolved config of a run: `config.yaml`, else the checkpoint's saved "config"."""
    saved = read_config(run_dir)
    if saved is not None:
        return OmegaConf.to_container(saved, resolve=True)
    if checkpoint_path(run_dir).is_file():
        return load_training_checkpoint(checkpoint_path(run_dir)).get("config") or {}
    return {}


