"""One row per run of a sweep, then one row per variant (seeds aggregated as mean and std).

A variant is what the run's config says about attention, placement, backbone and data (plus any
`extra_keys`); runs that differ only in `seed` are its repeats. The sparsity columns come from the
run's `analysis/analysis.json` when `sparse-detr-analyze` ran, else from the `sparsity/...` and
`paibb/...` metrics of the last evaluation in `metrics.jsonl`.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from sparse_detr.analysis.attention_stats import site_summary
from sparse_detr.analysis.run_folders import last_logged, logged_paibb, logged_sparsity, run_config, training_time_s
from sparse_detr.naming import attention_and_placement, select
from sparse_detr.run_folder import ANALYSIS_NAME, EVAL_METRICS_NAME, analysis_dir, read_json, read_metrics_log
from sparse_detr.sites import SITE_LIST
from sparse_detr.provenance import read_provenance, run_commits
from sparse_detr.metrics.names import CLASS_AP, GRID_METRICS
from sparse_detr.tracking import LEARNED_GROUPS, PAIBB, SPARSITY

VARIANT_COLUMNS = ("attention", "placement", "backbone", "data")
TIME_COLUMN = "train_time_s"
INIT = "init"          # a record's {site: {metric: value}} of the model at initialisation (or None)
CODE_COLUMN = "code"   # the git commits (";"-joined, "+dirty" for uncommitted changes) that trained the runs
# the metrics.jsonl groups a run record reads: sparsity, learned mapping parameters, PAIBB
LOG_PREFIXES = [SPARSITY + "/", *(group + "/" for group in LEARNED_GROUPS), PAIBB + "/"]


def _short(state: str) -> str:
    """A code state with the commit cut to 12 characters: `0123456789ab+dirty`."""
    commit, dirty, _ = state.partition("+dirty")
    return (commit if commit == "unknown" else commit[:12]) + dirty


def mixed_code(variants: Sequence[dict], variant_columns: Sequence[str]) -> list[str]:
    """A line per variant whose runs were not all trained by one clean commit (different commits,
    uncommitted changes, or no git record): their numbers may differ for reasons besides the seed."""
    lines = []
    for row in variants:
        states = row[CODE_COLUMN].split(";")
        if len(states) > 1 or states[0].endswith("+dirty") or states[0] == "unknown":
            name = " · ".join(str(row[c]) for c in variant_columns)
            lines.append(f"- {name}: {', '.join(map(_short, states))}")
    return lines


def variant_of(config: dict, extra_keys: Sequence[str] = ()) -> dict[str, str]:
    """attention/placement/backbone/data labels of a run (+ extra keys), named after what runs at
    each site as run folders are (`sparse_detr.naming`): all softmax is the softmax baseline,
    whatever `attention.name` says."""
    attention, placement = attention_and_placement(config)
    if attention == "alpha_entmax":
        alpha = select(config, "attention.alpha")
        if select(config, "attention.alpha_init") == "random":
            alpha = "random"
        attention += f" (learned, init {alpha})" if select(config, "attention.learn_alpha") else f" ({alpha})"
    elif attention == "tvmax":   # a learned lambda and a fixed one are different variants
        tv_lambda = select(config, "attention.tv_lambda")
        attention += f" (learned, init {tv_lambda})" if select(config, "attention.learn_lambda") else f" ({tv_lambda})"
    return {"attention": attention, "placement": placement, "backbone": str(select(config, "backbone.name", "?")),
            "data": str(select(config, "data.name", "?")), **{key: str(select(config, key)) for key in extra_keys}}


def sparsity_columns(metrics: Sequence[str]) -> list[str]:
    """`<site>/<metric>` for every site (the grid metrics only where the keys are the feature map),
    then `cross/paibb`."""
    return [f"{site.name}/{metric}" for site in SITE_LIST for metric in metrics
            if site.grid_keys or metric not in GRID_METRICS] + ["cross/paibb"]


def run_record(run_dir: Path, coco_metrics: Sequence[str], sparsity_metrics: Sequence[str],
               extra_keys: Sequence[str] = (), log: list[dict] | None = None) -> dict:
    """One run: its variant, seed, COCO metrics (eval_metrics.json), per-site sparsity and training time.

    log: the run's metrics.jsonl rows if already read (they need the LOG_PREFIXES keys)."""
    config = run_config(run_dir)
    log = read_metrics_log(run_dir, prefixes=LOG_PREFIXES) if log is None else log
    coco = read_json(run_dir / EVAL_METRICS_NAME) or {}
    analysis = read_json(analysis_dir(run_dir) / ANALYSIS_NAME)
    summary = analysis["summary"] if analysis else site_summary(logged_sparsity(log))
    if not analysis and logged_paibb(log) is not None:
        summary.setdefault("cross", {})["paibb"] = logged_paibb(log)
    record = {"run": str(run_dir), "seed": config.get("seed"), **variant_of(config, extra_keys),
              "sparsity_from": "analysis" if analysis else ("log" if summary else "")}
    record.update({name: _number(coco.get(name)) for name in coco_metrics})
    record.update({name: _number(value) for name, value in coco.items() if name.startswith(CLASS_AP + "/")})
    learned = (analysis or {}).get("learned") or (analysis or {}).get("alphas") or {}  # older analyses: alphas only
    for group in LEARNED_GROUPS:  # final value per head of each learned mapping parameter (alpha, lambda)
        record[group] = {k: v for k, v in learned.items() if k.startswith(group + "/")} or last_logged(log, group + "/")
    record[INIT] = ((analysis or {}).get("init") or {}).get("summary")  # sparsity of the initial model, if analysed
    for column in sparsity_columns(sparsity_metrics):
        site, metric = column.split("/")
        record[column] = _number(summary.get(site, {}).get(metric))
    record[TIME_COLUMN] = training_time_s(log)
    record[CODE_COLUMN] = ";".join(sorted(run_commits(read_provenance(run_dir))))
    return record


def aggregate(records: Sequence[dict], value_columns: Sequence[str], variant_columns: Sequence[str]) -> list[dict]:
    """One row per variant, sorted: the variant columns, `runs`, `seeds`, and for each value column
    its mean (`<column>`) and sample std over the runs (`<column>_std`, NaN for a single run).
    NaN or absent values (a metric a run lacks) are left out of both."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[c] for c in variant_columns), []).append(record)
    rows = []
    for key in sorted(groups, key=lambda k: tuple(map(str, k))):
        runs = groups[key]
        row = {**dict(zip(variant_columns, key)), "runs": len(runs),
               "seeds": ";".join(sorted(str(r["seed"]) for r in runs)),
               CODE_COLUMN: ";".join(sorted({c for r in runs for c in r.get(CODE_COLUMN, "unknown").split(";")}))}
        for column in value_columns:
            row[column], row[f"{column}_std"] = mean_std([r.get(column, math.nan) for r in runs])
        rows.append(row)
    return rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    return mean, statistics.stdev(finite) if len(finite) > 1 else math.nan


def _number(value) -> float:
    return math.nan if value is None else float(value)
