"""The report's answers beyond the variant table: each variant against the softmax baseline of
the same seeds, per-class AP, and the learned mapping parameters (alpha, lambda).

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
# The bands a learned parameter's final values are counted in: (what they say, ((key, column,
# test), ...)). Only alpha has ends that mean something (softmax near 1, sparsemax at 2).
BANDS = {ALPHA: (f"the share that went to the softmax end (< {SOFTMAX_END}), to the sparsemax end "
                 f"(> {SPARSEMAX_END}) or stayed between",
                 (("softmax_end", f"< {SOFTMAX_END}", lambda v: v < SOFTMAX_END),
                  ("between", "between", lambda v: SOFTMAX_END <= v <= SPARSEMAX_END),
                  ("sparsemax_end", f"> {SPARSEMAX_END}", lambda v: v > SPARSEMAX_END)))}


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


def learned_tables(records: Sequence[dict], variant_columns: Sequence[str], name: str) -> list[dict]:
    """Per variant that learned `name` (a `tracking.LEARNED_GROUPS` entry, each record's `record[name]`
    being its final `<name>/<site>/layer_<l>/head_<h>` values): the final value of every (site,
    layer, head), mean over its seeds; min, mean and max of all its (layer, head, seed) values; and
    for alpha the shares in each of its BANDS. [{"name", "variant", "heads": int, "count",
    "grid": {(site, layer): [per head]}, "mean": {key: value} (the grid as keys), "min",
    "overall", "max", and a share per band key}]"""
    grouped: dict[tuple, list[dict]] = {}
    for record in records:
        if record.get(name):
            grouped.setdefault(_key(record, variant_columns), []).append(record[name])
    out = []
    for key, runs in sorted(grouped.items(), key=lambda kv: tuple(map(str, kv[0]))):
        values: dict[tuple[str, int, int], list[float]] = {}
        for learned in runs:
            for logged, value in learned.items():
                site, layer, head = parse_site_key(logged)   # <name>/<site>/layer_<l>/head_<h>
                values.setdefault((site, layer, int(head.removeprefix("head_"))), []).append(float(value))
        heads = 1 + max(head for _, _, head in values)
        grid: dict[tuple[str, int], list[float]] = {}
        for (site, layer, head), seen in values.items():
            grid.setdefault((site, layer), [math.nan] * heads)[head] = statistics.fmean(seen)
        every = [v for seen in values.values() for v in seen]
        out.append({"name": name, "variant": " · ".join(map(str, key)), "heads": heads, "count": len(every),
                    "mean": {f"{name}/{site}/layer_{layer}/head_{head}": statistics.fmean(seen)
                             for (site, layer, head), seen in values.items()},
                    "grid": dict(sorted(grid.items(), key=lambda kv: (SITES.index(kv[0][0]), kv[0][1]))),
                    "min": min(every), "overall": statistics.fmean(every), "max": max(every),
                    **{band: sum(map(test, every)) / len(every) for band, _, test in BANDS.get(name, ("", ()))[1]}})
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


def learned_markdown(tables: Sequence[dict]) -> list[str]:
    """`## Learned <name>` of the tables of one name (`learned_tables`), a summary row per variant
    (count, alpha's band shares, min, mean, max), then the value of every head and layer."""
    if not tables:
        return []
    name = tables[0]["name"]
    shares, bands = BANDS.get(name, ("", ()))
    lines = [f"## Learned {name}", "",
             f"Final {name} of every head and layer (mean over seeds); over all heads, layers and seeds "
             f"{shares + ', and ' if shares else ''}the smallest, mean and largest value.", "",
             markdown_table(["variant", f"{name}s", *(column for _, column, _ in bands), "min", "mean", "max"],
                            [[t["variant"], t["count"], *(t[band] for band, _, _ in bands), t["min"], t["overall"],
                              t["max"]] for t in tables])]
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
