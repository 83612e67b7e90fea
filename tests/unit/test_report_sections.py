"""The report's answers on hand-made runs whose results are known: each variant against the softmax
baseline of the same seeds, per-class AP, and the learned alphas and lambdas."""
from __future__ import annotations

import math

import pytest

from sparse_detr.analysis.report_sections import (baseline_comparison, class_ap_table, comparison_markdown,
                                                  learned_markdown, learned_tables)
from sparse_detr.analysis.sweep_table import aggregate

COLUMNS = ["attention", "placement", "backbone"]


def run(attention, placement, seed, ap, backbone="resnet50", **extra):
    return {"attention": attention, "placement": placement, "backbone": backbone, "seed": seed, "AP": ap,
            "cross/zero_ratio": 0.5 if attention != "softmax" else 0.0, **extra}


RECORDS = [
    *(run("softmax", "none", s, ap) for s, ap in [(1, 0.40), (2, 0.42), (3, 0.41)]),
    *(run("sparsemax", "cross", s, ap) for s, ap in [(1, 0.43), (2, 0.45), (3, 0.44)]),   # +0.03 on every seed
    *(run("entmax15", "cross", s, ap) for s, ap in [(1, 0.405), (2, 0.415)]),             # +0.005, -0.005
    run("alpha_entmax", "cross", 1, 0.38),                                                 # one seed
    run("sparsemax", "cross", 1, 0.30, backbone="resnet18"),                               # no resnet18 baseline
    *(run("entmax15", "encoder", s, ap) for s, ap in [(7, 0.3), (8, 0.31)]),              # seeds the baseline lacks
]


def comparison():
    variants = aggregate(RECORDS, ["AP", "cross/zero_ratio"], COLUMNS)
    return variants, {(r["attention"], r["placement"], r["backbone"]): r
                      for r in baseline_comparison(RECORDS, variants, COLUMNS)}


def test_each_variant_is_compared_with_the_softmax_baseline_of_the_same_seeds():
    _, rows = comparison()
    sparse = rows["sparsemax", "cross", "resnet50"]
    assert sparse["delta"] == pytest.approx(0.03) and sparse["delta_std"] == pytest.approx(0.0, abs=1e-12)
    assert sparse["paired_seeds"] == 3 and sparse["noise"] == pytest.approx(0.01) and sparse["verdict"] == "above"
    entmax = rows["entmax15", "cross", "resnet50"]
    assert entmax["delta"] == pytest.approx(0.0, abs=1e-12) and entmax["paired_seeds"] == 2
    assert entmax["noise"] == pytest.approx(0.01) and entmax["verdict"] == "within seed noise"
    assert rows["alpha_entmax", "cross", "resnet50"]["delta"] == pytest.approx(-0.02)   # seed 1: 0.38 - 0.40
    assert rows["alpha_entmax", "cross", "resnet50"]["verdict"] == "one seed"
    assert rows["sparsemax", "cross", "resnet18"]["verdict"] == "no baseline"
    assert rows["entmax15", "encoder", "resnet50"]["verdict"] == "no common seed"
    assert rows["softmax", "none", "resnet50"]["verdict"] == "baseline"


def test_the_first_table_says_which_differences_are_seed_noise():
    variants, rows = comparison()
    text = "\n".join(comparison_markdown(list(rows.values()), COLUMNS, ["cross/zero_ratio"], variants))
    assert "| sparsemax | cross | resnet50 | 1;2;3 | 0.440 ± 0.010 | 0.030 ± 0.000 (n=3) | 0.010 | above | 0.500 ± 0.000 |" \
        in text
    assert "Within seed noise: entmax15 · cross · resnet50. Beyond it: sparsemax · cross · resnet50." in text


def test_a_better_variant_within_noise_is_not_called_better():
    records = [run("softmax", "none", s, ap) for s, ap in [(1, 0.30), (2, 0.40)]] + \
              [run("sparsemax", "cross", s, ap) for s, ap in [(1, 0.33), (2, 0.43)]]
    variants = aggregate(records, ["AP"], COLUMNS)
    row = baseline_comparison(records, variants, COLUMNS)[1]
    assert row["delta"] == pytest.approx(0.03) and row["noise"] == pytest.approx(math.sqrt(0.005))
    assert row["verdict"] == "within seed noise"


def test_per_class_ap_is_a_row_per_class_and_a_column_per_variant():
    records = [run("softmax", "none", 1, 0.4, **{"AP_class/cat": 0.2, "AP_class/dog": 0.6}),
               run("softmax", "none", 2, 0.4, **{"AP_class/cat": 0.4, "AP_class/dog": math.nan}),
               run("sparsemax", "cross", 1, 0.4, **{"AP_class/cat": 0.5})]
    variants = aggregate(records, ["AP", "AP_class/cat", "AP_class/dog"], COLUMNS)
    headers, rows = class_ap_table(variants, COLUMNS)
    assert headers == ["class", "softmax · none · resnet50", "sparsemax · cross · resnet50"]
    assert rows[0] == ["cat", pytest.approx(0.3), pytest.approx(0.5)]
    assert rows[1][0] == "dog" and rows[1][1] == pytest.approx(0.6) and math.isnan(rows[1][2])


def test_learned_alphas_are_averaged_over_seeds_and_counted_at_either_end():
    def alphas(values):
        return {f"alpha/cross/layer_{l}/head_{h}": values[l][h] for l in range(2) for h in range(2)}

    records = [run("alpha_entmax", "cross", 1, 0.4, alpha=alphas([[1.05, 1.5], [1.95, 1.2]])),
               run("alpha_entmax", "cross", 2, 0.4, alpha=alphas([[1.07, 1.3], [1.99, 1.92]])),
               run("softmax", "none", 1, 0.4, alpha={})]
    [table] = learned_tables(records, COLUMNS, "alpha")
    assert table["variant"] == "alpha_entmax · cross · resnet50" and table["count"] == 8 and table["heads"] == 2
    assert table["grid"][("cross", 0)] == pytest.approx([1.06, 1.4])
    assert table["grid"][("cross", 1)] == pytest.approx([1.97, 1.56])
    assert table["mean"] == pytest.approx({"alpha/cross/layer_0/head_0": 1.06, "alpha/cross/layer_0/head_1": 1.4,
                                           "alpha/cross/layer_1/head_0": 1.97, "alpha/cross/layer_1/head_1": 1.56})
    assert (table["softmax_end"], table["between"], table["sparsemax_end"]) == (2 / 8, 3 / 8, 3 / 8)
    assert (table["min"], table["max"]) == (1.05, 1.99) and table["overall"] == pytest.approx(11.98 / 8)
    text = "\n".join(learned_markdown([table]))
    assert "## Learned alpha" in text and "softmax end (< 1.1)" in text
    assert "| alpha_entmax · cross · resnet50 | 8 | 0.250 | 0.375 | 0.375 | 1.050 | 1.49" in text
    assert "| cross | 1 | 1.970 | 1.560 |" in text


def test_learned_lambdas_are_tabulated_per_site_layer_and_head_without_alpha_bands():
    def lambdas(encoder, cross):
        return {**{f"lambda/encoder/layer_0/head_{h}": v for h, v in enumerate(encoder)},
                **{f"lambda/cross/layer_{l}/head_{h}": cross[l][h] for l in range(2) for h in range(2)}}

    records = [run("tvmax", "all", 1, 0.4, **{"lambda": lambdas([0.1, 0.3], [[0.2, 0.4], [1.0, 2.0]])}),
               run("tvmax", "all", 2, 0.4, **{"lambda": lambdas([0.3, 0.5], [[0.4, 0.6], [3.0, 4.0]])}),
               run("alpha_entmax", "cross", 1, 0.4, alpha={"alpha/cross/layer_0/head_0": 1.5})]
    [table] = learned_tables(records, COLUMNS, "lambda")
    assert table["variant"] == "tvmax · all · resnet50" and table["count"] == 12 and table["heads"] == 2
    assert list(table["grid"]) == [("encoder", 0), ("cross", 0), ("cross", 1)]   # in site order
    assert table["grid"][("encoder", 0)] == pytest.approx([0.2, 0.4])
    assert table["grid"][("cross", 1)] == pytest.approx([2.0, 3.0])
    assert table["mean"]["lambda/cross/layer_0/head_1"] == pytest.approx(0.5)
    assert (table["min"], table["max"]) == (0.1, 4.0) and table["overall"] == pytest.approx(12.8 / 12)
    assert not {"softmax_end", "between", "sparsemax_end"} & set(table)
    text = "\n".join(learned_markdown([table]))
    assert "## Learned lambda" in text and "softmax" not in text
    assert "| variant | lambdas | min | mean | max |" in text
    assert "| tvmax · all · resnet50 | 12 | 0.100 | 1.067 | 4.000 |" in text
    assert "| cross | 1 | 2.000 | 3.000 |" in text
    assert learned_markdown(learned_tables(records[2:], COLUMNS, "lambda")) == []
