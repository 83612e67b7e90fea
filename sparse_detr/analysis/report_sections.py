"""The report's answers beyond the variant table: each variant against the softmax baseline of
the same seeds, per-class AP, and the learned alphas.

Rows come from `sweep_table.run_record` (one per run) and `sweep_table.aggregate` (one per variant).
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from sparse_detr.analysis.run_folders import parse_site_key
from sparse_detr.analysis.sweep_table import INIT, mean_std
from sparse_detr.analysis.tables import cell, markdown_table
from sparse_detr.metrics.names import CLASS_AP
from sparse_detr.sites import SITES
from sparse_detr.tracking import ALPHA

BASELINE = {"attention": "softmax", "placement": "none"}   # every site softmax (sparse_detr.naming)
SOFTMAX_END, SPARSEMAX_END = 1.1, 1.9                       # learned alpha counted as gone to either end


def _key(row: dict, columns: Sequence[str]) -> tuple:
    return tuple(row[c] for c in columns)


def baseline_comparison(records: Sequence[dict], variants: Sequence[dict], variant_columns: Sequence[str],
                        metric: str = "AP") -> list[dict]:
    """Per variant: `metric` mean and seed std, and its difference from the softmax baseline with
    the same backbone, data and other variant keys, paired by seed (only seeds both have).

    noise: the larger of the two variants' seed stds (NaN with one seed each); `verdict` says
    whether |delta| is within it ("within seed noise"), beyond it ("above" / "below"), or cannot
    be told ("one seed", "no baseline", "no common seed")."""
    by_variant: dict[tuple, dict[int, float]] = {}
    for record in records:
        by_variant.setdefault(_key(record, variant_columns), {})[record["seed"]] = record[metric]
    stds = {_key(v, variant_columns): v[f"{metric}_std"] for v in variants}
    rows = []
    for variant in variants:
        key = _key(variant, variant_columns)
        base_key = tuple(BASELINE.get(c, variant[c]) for c in variant_columns)
        row = {**{c: variant[c] for c in variant_columns}, "seeds": variant["seeds"], metric: variant[metric],
               f"{metric}_std": variant[f"{metric}_std"], "delta": math.nan, "delta_std": math.nan,
               "paired_seeds": 0, "noise": math.nan, "verdict": "baseline" if key == base_key else "no baseline"}
        if key != base_key and base_key in by_variant:
            mine, base = by_variant[key], by_variant[base_key]
            common = sorted(set(mine) & set(base), key=str)
            diffs = [mine[s] - base[s] for s in common if math.isfinite(mine[s]) and math.isfinite(base[s])]
            row["delta"], row["delta_std"] = mean_std(diffs)
            row["paired_seeds"] = len(diffs)
            row["noise"] = max(stds[key], stds[base_key]) if len(mine) > 1 and len(base) > 1 else math.nan
            row["verdict"] = _verdict(row["delta"], row["noise"], len(diffs))
        rows.append(row)
    return rows


def _verdict(delta: float, noise: float, paired: int) -> str:
    if paired == 0:
        return "no common seed"
    if math.isnan(noise):
        return "one seed"
    if abs(delta) <= noise:
        return "within seed noise"
    return "above" if delta > 0 else "below"


def class_ap_table(variants: Sequence[dict], variant_columns: Sequence[str]) -> tuple[list[str], list[list]]:
    """Headers and rows of per-class AP: a row per class, a column per variant (mean over seeds)."""
    classes = sorted({k for v in variants for k in v if k.startswith(CLASS_AP + "/") and not k.endswith("_std")})
    headers = ["class", *(" · ".join(str(v[c]) for c in variant_columns) for v in variants)]
    rows = [[name.split("/", 1)[1], *(v.get(name, math.nan) for v in variants)] for name in classes]
    return headers, rows


def class_ap_columns(records: Sequence[dict]) -> list[str]:
    """Every `AP_class/<name>` key of any run, sorted."""
    return sorted({k for r in records for k in r if k.startswith(CLASS_AP + "/")})


def alpha_tables(records: Sequence[dict], variant_columns: Sequence[str]) -> list[dict]:
    """Per variant with learned alphas: the final alpha of every (site, layer, head), mean over its
    seeds, and the shares of all its (layer, head, seed) alphas below SOFTMAX_END, above
    SPARSEMAX_END and between. [{"variant", "heads": int, "grid": {(site, layer): [per head]},
    "mean": {alpha key: value} (the grid as `alpha/<site>/layer_<l>/head_<h>`), "softmax_end",
    "between", "sparsemax_end", "count"}]"""
    grouped: dict[tuple, list[dict]] = {}
    for record in records:
        if record.get(ALPHA):
            grouped.setdefault(_key(record, variant_columns), []).append(record[ALPHA])
    out = []
    for key, runs in sorted(grouped.items(), key=lambda kv: tuple(map(str, kv[0]))):
        values: dict[tuple[str, int, int], list[float]] = {}
        for alphas in runs:
            for name, value in alphas.items():
                site, layer, head = parse_site_key(name)   # alpha/<site>/layer_<l>/head_<h>
                values.setdefault((site, layer, int(head.removeprefix("head_"))), []).append(float(value))
        heads = 1 + max(head for _, _, head in values)
        grid: dict[tuple[str, int], list[float]] = {}
        for (site, layer, head), seen in values.items():
            grid.setdefault((site, layer), [math.nan] * heads)[head] = statistics.fmean(seen)
        every = [v for seen in values.values() for v in seen]
        low, high = sum(v < SOFTMAX_END for v in every), sum(v > SPARSEMAX_END for v in every)
        out.append({"variant": " · ".join(map(str, key)), "heads": heads, "count": len(every),
                    "mean": {f"{ALPHA}/{site}/layer_{layer}/head_{head}": statistics.fmean(seen)
                             for (site, layer, head), seen in values.items()},
                    "grid": dict(sorted(grid.items(), key=lambda kv: (SITES.index(kv[0][0]), kv[0][1]))),
                    "softmax_end": low / len(every), "sparsemax_end": high / len(every),
                    "between": (len(every) - low - high) / len(every)})
    return out


def comparison_markdown(rows: Sequence[dict], variant_columns: Sequence[str], sparsity: Sequence[str],
                        variants: Sequence[dict], metric: str = "AP") -> list[str]:
    """The report's first table, and the sentence that says which differences are seed noise."""
    by_key = {_key(v, variant_columns): v for v in variants}
    table = markdown_table(
        [*variant_columns, "seeds", metric, f"Δ{metric} vs softmax (same seeds)", "seed noise", "verdict", *sparsity],
        [[*(r[c] for c in variant_columns), r["seeds"], cell(r[metric], r[f"{metric}_std"]),
          cell(r["delta"], r["delta_std"]) + (f" (n={r['paired_seeds']})" if r["paired_seeds"] else ""),
          r["noise"], r["verdict"],
          *(cell(by_key[_key(r, variant_columns)][c], by_key[_key(r, variant_columns)][f"{c}_std"]) for c in sparsity)]
         for r in rows])
    within = [" · ".join(str(r[c]) for c in variant_columns) for r in rows if r["verdict"] == "within seed noise"]
    beyond = [" · ".join(str(r[c]) for c in variant_columns) for r in rows if r["verdict"] in ("above", "below")]
    lines = [f"Δ{metric}: the mean over shared seeds of (variant − softmax baseline of the same backbone and data), "
             f"± the std of those differences. Seed noise: the larger seed std of {metric} of the two; a difference "
             "no larger than that is within seed noise.", "", table, ""]
    lines.append("Within seed noise: " + (", ".join(within) if within else "none") + ". "
                 "Beyond it: " + (", ".join(beyond) if beyond else "none") + ".")
    return lines + [""]


def class_ap_markdown(variants: Sequence[dict], variant_columns: Sequence[str]) -> list[str]:
    headers, rows = class_ap_table(variants, variant_columns)
    if not rows:
        return []
    return ["## AP per class", "", "COCO AP@[.5:.95] of each class in the final evaluation, mean over seeds.", "",
            markdown_table(headers, rows), ""]


def alpha_markdown(tables: Sequence[dict]) -> list[str]:
    """Per variant with learned alphas: the shares at either end, and the alpha of every head and layer."""
    if not tables:
        return []
    lines = ["## Learned alpha", "",
             f"Final alpha of every head and layer (mean over seeds), and the share of all heads, layers and seeds "
             f"that went to the softmax end (< {SOFTMAX_END}), to the sparsemax end (> {SPARSEMAX_END}), or stayed "
             "between.", ""]
    lines.append(markdown_table(["variant", "alphas", f"< {SOFTMAX_END}", "between", f"> {SPARSEMAX_END}"],
                                [[t["variant"], t["count"], t["softmax_end"], t["between"], t["sparsemax_end"]]
                                 for t in tables]))
    for table in tables:
        lines += ["", f"**{table['variant']}**", "",
                  markdown_table(["site", "layer", *(f"head {h}" for h in range(table["heads"]))],
                                 [[site, layer, *values] for (site, layer), values in table["grid"].items()])]
    return lines + [""]


def init_reference_markdown(records: Sequence[dict], variants: Sequence[dict], variant_columns: Sequence[str],
                            sparsity: Sequence[str]) -> list[str]:
    """Per analysed variant, its sparsity trained and at initialisation (`sparse-detr-analyze`'s
    reference measurement of the same model as training started it), mean over seeds."""
    at_init: dict[tuple, list[dict]] = {}
    for record in records:
        if record.get(INIT):
            at_init.setdefault(_key(record, variant_columns), []).append(record[INIT])
    rows = []
    for variant in variants:
        inits = at_init.get(_key(variant, variant_columns))
        if not inits:
            continue
        label = " · ".join(str(variant[c]) for c in variant_columns)
        rows.append([label, "trained", *(cell(variant[c], variant[f"{c}_std"]) for c in sparsity)])
        rows.append([label, "at initialisation", *(
            cell(*mean_std([init.get(c.split("/")[0], {}).get(c.split("/")[1], math.nan) for init in inits]))
            for c in sparsity)])
    if not rows:
        return []
    return ["## Sparsity at initialisation", "",
            "The same models as their training started them (same seeds), measured on the same images by "
            "`sparse-detr-analyze`: how much of the sparsity was learned.", "",
            markdown_table(["variant", "model", *sparsity], rows), ""]
