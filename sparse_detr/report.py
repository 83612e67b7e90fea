"""`sparse-detr-report`: one table of a sweep, COCO AP next to attention sparsity, per variant.

    sparse-detr-report sweep_dir=multirun/2024-05-01/12-00-00          # searched for run folders
    sparse-detr-report 'runs=[outputs/softmax_s1,outputs/softmax_s2,outputs/sparsemax_s1]' output_dir=report
    sparse-detr-report sweep_dir=SWEEP 'variant_keys=[optim.lr]' 'curves=[val-epoch-metrics/AP]'

Reads local files only (eval_metrics.json, config.yaml, metrics.jsonl, analysis/analysis.json).
Writes into `output_dir` (default `<sweep_dir>/report`, else `./report`): report.md, report.csv
(one row per variant, seeds as mean and std), runs.csv (one row per run) and figures/.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from sparse_detr.analysis.tables import cell
from sparse_detr.checks import check_choice, check_range
from sparse_detr.config import ConfigError, config_dir, exit_on_bad_overrides, reports_config_errors, validate
from sparse_detr.metrics.names import GRID_METRICS, METRIC_NAMES
from sparse_detr.metrics.names import SPARSITY_METRICS as METRICS
from sparse_detr.run_folder import find_run_folders, read_metrics_log
from sparse_detr.sites import SITE_BY_NAME, SITES
from sparse_detr.tracking import LEARNED_GROUPS, axis_of
from sparse_detr.viz import FORMATS

DEFAULT_CURVES = ["train-metrics/class_error_unscaled", "train-metrics/loss_bbox_unscaled", "val-epoch-metrics/AP"]


@dataclass
class ReportConfig:
    sweep_dir: Optional[str] = None      # a sweep folder, searched recursively for run folders
    runs: List[str] = field(default_factory=list)  # run folders (or more folders to search)
    output_dir: Optional[str] = None     # None: <sweep_dir>/report, else ./report
    variant_keys: List[str] = field(default_factory=list)  # more config keys that tell variants apart
    # COCO metrics to tabulate; the first is the y axis of the AP-vs-sparsity plot
    metrics: List[str] = field(default_factory=lambda: ["AP", "AP50", "AP75", "APs", "APm", "APl"])
    sparsity_metrics: List[str] = field(default_factory=lambda: ["zero_ratio", "gini"])  # per site
    scatter_metric: str = "zero_ratio"   # x axis of the AP-vs-sparsity plot (one of sparsity_metrics)
    curves: List[str] = field(default_factory=lambda: list(DEFAULT_CURVES))  # metrics.jsonl keys to plot
    formats: List[str] = field(default_factory=lambda: ["png", "pdf"])
    dpi: int = 100
    # the cross-attention of one object of one validation image, a column per variant (needs checkpoints)
    attention_image: Optional[int] = None   # None: no such figure
    attention_object: int = 0               # index of the ground-truth object in that image

    def __post_init__(self):
        if not self.sweep_dir and not self.runs:
            raise ConfigError("give sweep_dir=FOLDER or runs=[RUN_FOLDER,...]")
        for key, path in [("sweep_dir", self.sweep_dir)] + [("runs[]", run) for run in self.runs]:
            if path and not Path(path).is_dir():
                raise ConfigError(f"{key}={path!r}: no such folder")
        if not self.metrics:
            raise ConfigError(f"metrics=[] is empty; give some of: {', '.join(METRIC_NAMES)}")
        for name in self.metrics:
            check_choice("metrics[]", name, METRIC_NAMES)
        for name in self.sparsity_metrics:
            check_choice("sparsity_metrics[]", name, METRICS)
        check_choice("scatter_metric", self.scatter_metric, self.sparsity_metrics)
        for key in self.curves:
            try:
                axis_of(key)
            except KeyError as error:
                raise ConfigError(f"curves[]={key!r}: {error.args[0]}") from None
        for fmt in self.formats:
            check_choice("formats[]", fmt, FORMATS)
        check_range("dpi", self.dpi, low=10)
        if self.attention_image is not None:
            check_range("attention_image", self.attention_image, low=0)
        check_range("attention_object", self.attention_object, low=0)


ConfigStore.instance().store(name="report_schema", node=ReportConfig)


def duration(mean: float, std: float) -> str:
    for unit, seconds in (("h", 3600), ("min", 60)):
        if mean >= 2 * seconds:
            return f"{cell(mean / seconds, std / seconds, 1)} {unit}"
    return "–" if math.isnan(mean) else f"{cell(mean, std, 0)} s"


def report(cfg: DictConfig) -> Path:
    """Validate, collect every run folder, write the table, the CSVs and the figures; returns the folder."""
    args: ReportConfig = validate(cfg)
    # torch (attention statistics) and matplotlib figures only once the config is known good
    from sparse_detr.analysis.sweep_table import (CODE_COLUMN, LOG_PREFIXES, TIME_COLUMN, VARIANT_COLUMNS, aggregate,
                                                  mixed_code, run_record, sparsity_columns)
    from sparse_detr.analysis.report_sections import (baseline_comparison, class_ap_columns, class_ap_markdown,
                                                      class_ap_table, comparison_markdown, init_reference_markdown,
                                                      learned_markdown, learned_tables)
    from sparse_detr.analysis.tables import markdown_table, write_csv

    sources = [path for path in [args.sweep_dir, *args.runs] if path]
    folders = find_run_folders(sources)
    if not folders:
        raise ConfigError(f"no run folders (with eval_metrics.json or checkpoint.pth) under {', '.join(sources)}")
    out = Path(args.output_dir or (Path(args.sweep_dir) / "report" if args.sweep_dir else "report"))
    variant_columns = [*VARIANT_COLUMNS, *args.variant_keys]
    value_columns = [*args.metrics, *sparsity_columns(args.sparsity_metrics), TIME_COLUMN]  # mean and std per variant

    records, logs = [], []
    for folder in folders:
        logs.append(read_metrics_log(folder, prefixes=[*LOG_PREFIXES, *args.curves]))
        records.append(run_record(folder, args.metrics, args.sparsity_metrics, args.variant_keys, logs[-1]))
    variants = aggregate(records, [*value_columns, *class_ap_columns(records)], variant_columns)
    comparison = baseline_comparison(records, variants, variant_columns, args.metrics[0])
    learned = {name: learned_tables(records, variant_columns, name) for name in LEARNED_GROUPS}
    write_csv(out / "runs.csv", records, ["run", "seed", *variant_columns, "sparsity_from", *value_columns, CODE_COLUMN])
    write_csv(out / "report.csv", variants,
              [*variant_columns, "runs", "seeds", *(c for v in value_columns for c in (v, f"{v}_std")), CODE_COLUMN])
    write_csv(out / "comparison.csv", comparison,
              [*variant_columns, "seeds", args.metrics[0], f"{args.metrics[0]}_std", "delta", "delta_std",
               "paired_seeds", "noise", "verdict"])
    class_headers, class_rows = class_ap_table(variants, variant_columns)
    write_csv(out / "per_class_AP.csv", [dict(zip(class_headers, row)) for row in class_rows], class_headers)
    for name, tables in learned.items():   # alphas.csv, lambdas.csv: where some variant learned them
        if tables:
            write_csv(out / f"{name}s.csv", [{"variant": t["variant"], "site": site, "layer": layer, "head": head,
                                             name: value} for t in tables for (site, layer), heads in t["grid"].items()
                                            for head, value in enumerate(heads)],
                      ["variant", "site", "layer", "head", name])
    figures = report_figures(args, variants, records, logs, variant_columns, out / "figures")
    figures += learned_heatmaps(args, [t for tables in learned.values() for t in tables], out / "figures")
    if args.attention_image is not None:
        figures += attention_columns(args, records, variant_columns, out / "figures")

    scores = [*args.metrics, *sparsity_columns(args.sparsity_metrics)]
    table = markdown_table(
        [*variant_columns, "runs", *scores, "training time"],
        [[*(row[c] for c in variant_columns), row["runs"], *(cell(row[c], row[f"{c}_std"]) for c in scores),
          duration(row[TIME_COLUMN], row[f"{TIME_COLUMN}_std"])] for row in variants])
    from_analysis = sum(r["sparsity_from"] == "analysis" for r in records)
    lines = [
        "# Sweep report", "",
        f"{len(records)} runs, {len(variants)} variants, from {', '.join(f'`{s}`' for s in sources)}.",
        "Values are mean ± sample std over the runs (seeds) of a variant; COCO metrics from each run's "
        "final evaluation (eval_metrics.json).",
        f"Sparsity (mean over layers and heads per site): from `analysis/` for {from_analysis} runs, from the last "
        f"evaluation logged in metrics.jsonl for the others (PAIBB: last decoder layer, all objects, head mean).", "",
        *comparison_markdown(comparison, variant_columns, sparsity_columns(args.sparsity_metrics), variants,
                             args.metrics[0]),
        "## Every metric", "",
        table, "",
    ]
    flagged = mixed_code(variants, variant_columns)
    if flagged:
        lines += ["**Code differs within a variant.** These variants' runs were not all trained by one clean "
                  "commit (`provenance.json` of each run; `+dirty`: uncommitted changes, `unknown`: no git "
                  "record), so their spread is not only the seeds':", "", *flagged, ""]
    lines += [*init_reference_markdown(records, variants, variant_columns, sparsity_columns(args.sparsity_metrics)),
              *class_ap_markdown(variants, variant_columns), *(line for tables in learned.values() for line in learned_markdown(tables))]
    lines += [f"![{path.stem}]({path.relative_to(out)})" for path in figures if path.suffix == ".png"]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(table)
    print(f"report folder: {out.resolve()}")
    return out


def report_figures(args: ReportConfig, variants, records, logs, variant_columns, out: Path) -> list[Path]:
    """AP against `scatter_metric` per site (variants), and training curves (runs, colored by variant)."""
    from sparse_detr.viz import save_figure
    from sparse_detr.viz.curves import training_curves_figure
    from sparse_detr.viz.sparsity_plots import ap_vs_sparsity_figure

    def label(row):
        return " · ".join(str(row[c]) for c in variant_columns)

    ap = args.metrics[0]
    points = {site: [(label(v), v[f"{site}/{args.scatter_metric}"], v[f"{site}/{args.scatter_metric}_std"], v[ap],
                      v[f"{ap}_std"]) for v in variants if not math.isnan(v[f"{site}/{args.scatter_metric}"])]
              for site in SITES if SITE_BY_NAME[site].grid_keys or args.scatter_metric not in GRID_METRICS}
    paths = save_figure(ap_vs_sparsity_figure(points, args.scatter_metric, ap), out / f"{ap}_vs_{args.scatter_metric}",
                        args.formats, args.dpi)
    if args.curves:
        colors = {label(v): f"C{i % 10}" for i, v in enumerate(variants)}
        runs = [(f"{label(r)} (seed {r['seed']})", colors[label(r)], log) for r, log in zip(records, logs)]
        paths += save_figure(training_curves_figure(runs, args.curves), out / "training_curves", args.formats, args.dpi)
    return paths


def attention_columns(args: ReportConfig, records, variant_columns, out: Path) -> list[Path]:
    """`cross_attention_image_<i>_object_<j>`: a column per variant (its lowest-seed run with a
    checkpoint; variants without one are left out), a row per decoder layer."""
    from sparse_detr.analysis.variant_attention import object_attention
    from sparse_detr.engine.checkpoint import CHECKPOINT_NAME
    from sparse_detr.viz import save_figure
    from sparse_detr.viz.attention_maps import variant_attention_figure

    chosen: dict[tuple, dict] = {}
    for record in sorted(records, key=lambda r: str(r["seed"])):
        if (Path(record["run"]) / CHECKPOINT_NAME).is_file():
            chosen.setdefault(tuple(record[c] for c in variant_columns), record)
    if not chosen:
        return []
    columns, picture, box = [], None, None
    for key, record in sorted(chosen.items(), key=lambda kv: tuple(map(str, kv[0]))):
        shown, object_box, maps = object_attention(record["run"], args.attention_image, args.attention_object)
        picture, box = (shown, object_box) if picture is None else (picture, box)
        columns.append((f"{' · '.join(map(str, key))} (seed {record['seed']})", maps))
    title = f"validation image {args.attention_image}, object {args.attention_object}: head-averaged cross-attention"
    return save_figure(variant_attention_figure(picture, box, columns, title),
                       out / f"cross_attention_image_{args.attention_image}_object_{args.attention_object}",
                       args.formats, args.dpi)


def learned_heatmaps(args: ReportConfig, tables: list[dict], out: Path) -> list[Path]:
    """`<name>s_<variant>` (`alphas_...`, `lambdas_...`): the learned value of every layer and head
    (mean over seeds), per variant and learned name (`learned_tables`)."""
    from sparse_detr.viz import save_figure
    from sparse_detr.viz.alphas import alpha_grids, alpha_heatmap_figure

    paths = []
    for table in tables:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", table["variant"]).strip("_")
        paths += save_figure(alpha_heatmap_figure(alpha_grids(table["mean"]), table["name"]),
                             out / f"{table['name']}s_{stem}", args.formats, args.dpi)
    return paths


@hydra.main(config_path=str(config_dir()), config_name="report", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> None:
    report(cfg)


def main() -> None:
    exit_on_bad_overrides("report", sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
