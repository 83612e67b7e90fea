"""`sparse-detr-analyze` on a real smoke checkpoint and `sparse-detr-report` over run folders.

One tiny training run (alpha-entmax learned at the cross site, one epoch) is shared by the module;
the sweep table is checked on hand-written run folders whose aggregates are known.
"""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sparse_detr.analyze
import sparse_detr.report
from sparse_detr import load_config
from sparse_detr.analysis.run_folders import series, training_time_s
from sparse_detr.run_folder import find_run_folders, read_metrics_log
from sparse_detr.config import ConfigError

SMOKE = ["experiment=smoke", "schedule.epochs=1", "logger=none", "train.progress=off",
         "attention=alpha_entmax", "placement=cross", "attention.impl=eager"]


def run(command, cwd, check=True, timeout=300):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "alpha_cross"
    run([sys.executable, "-m", "sparse_detr.train", *SMOKE, f"output_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"],
        cwd=run_dir.parent)
    return run_dir


@pytest.fixture(scope="module")
def analyzed_run(trained_run) -> Path:
    """The trained run with its default `analysis/` folder (all 16 val images, like its last evaluation)."""
    overrides = [f"checkpoint={trained_run}", "figures.images=[0]", "figures.max_queries=2"]
    sparse_detr.analyze.analyze(load_config(overrides, config_name="analyze"))
    return trained_run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_analyze_writes_tables_summary_and_figures_with_values_in_range(analyzed_run):
    out = analyzed_run / "analysis"
    sparsity, paibb = read_csv(out / "sparsity.csv"), read_csv(out / "paibb.csv")
    assert len(sparsity) == 3 * 2 * (4 + 1)  # sites x layers x (heads + mean)
    for row in sparsity:
        zero, near, gini = float(row["zero_ratio"]), float(row["near_zero_ratio"]), float(row["gini"])
        assert 0 <= zero <= near <= 1 and 0 <= gini < 1
        assert 1 <= float(row["support"]) and 0 <= float(row["entropy"]) <= math.log(float(row["support"])) + 1e-6
        if row["site"] != "cross":  # softmax sites have no exact zeros
            assert zero == 0
    assert any(float(r["zero_ratio"]) > 0 for r in sparsity if r["site"] == "cross")
    assert [r["head"] for r in paibb] == ["0", "1", "2", "3", "mean"] and {r["layer"] for r in paibb} == {"1"}
    assert all(0 <= float(r["paibb"]) <= 1 and int(r["pairs"]) > 0 for r in paibb)

    result = json.loads((out / "analysis.json").read_text())
    assert result["num_images"] == 16 and result["split"] == "val" and result["global_step"] == 8
    assert set(result["summary"]) == {"encoder", "decoder", "cross"} and 0 <= result["summary"]["cross"]["paibb"] <= 1
    assert len(result["alphas"]) == 2 * 4 and all(1 < a <= 2 for a in result["alphas"].values())
    summary = (out / "summary.md").read_text()
    assert "## PAIBB" in summary and "alpha_entmax" in summary and "figures/alphas.png" in summary

    figures = {p.name for p in (out / "figures").iterdir()}
    image_id = 1  # the first val image of the shapes set
    expected = {f"image_{image_id}_detections", "sparsity_zero_ratio", "sparsity_gini", "paibb", "alphas",
                "alpha_trajectories"}
    assert {f"{name}.{fmt}" for name in expected for fmt in ("png", "pdf")} <= figures
    queries = [name for name in figures if name.startswith(f"image_{image_id}_query_") and name.endswith(".png")]
    assert 1 <= len(queries) <= 2


def test_analyze_measures_the_initial_model_as_a_reference(analyzed_run):
    """The reference row: the run's model as its training started it, on the same images; softmax
    sites have no zeros there either, and one epoch of training changed the cross-attention."""
    out = analyzed_run / "analysis"
    result = json.loads((out / "analysis.json").read_text())
    init = read_csv(out / "sparsity_init.csv")
    assert [(r["site"], r["layer"], r["head"]) for r in init] == \
        [(r["site"], str(r["layer"]), str(r["head"])) for r in result["sparsity"]]
    assert all(float(r["zero_ratio"]) == 0 for r in init if r["site"] != "cross")
    assert result["init"]["sparsity"] != result["sparsity"]
    trained = {(r["site"], r["layer"], r["head"]): r["gini"] for r in result["sparsity"]}
    assert any(abs(r["gini"] - trained[r["site"], r["layer"], r["head"]]) > 1e-4 for r in result["init"]["sparsity"])
    assert set(result["init"]["summary"]) == {"encoder", "decoder", "cross"}
    assert "zero_ratio (init)" in (out / "summary.md").read_text()


def test_an_untrained_run_is_its_own_initialisation_reference(tmp_path):
    """Known answer: with a learning rate of 1e-12 one step changes nothing that sparsity can see,
    so the reference measured from a fresh model with the run's seed equals the trained model's."""
    run_dir = tmp_path / "still"
    run([sys.executable, "-m", "sparse_detr.train", *SMOKE, "train.max_steps=1", "optim.lr=1e-12",
         "optim.lr_backbone=1e-12", "seed=5", f"output_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"], cwd=tmp_path)
    sparse_detr.analyze.analyze(load_config([f"checkpoint={run_dir}", "max_images=4", "figures.enabled=false"],
                                            config_name="analyze"))
    result = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    for trained, initial in zip(result["sparsity"], result["init"]["sparsity"]):
        assert (trained["site"], trained["layer"], trained["head"]) == (initial["site"], initial["layer"], initial["head"])
        for metric in ("zero_ratio", "gini", "entropy"):
            assert initial[metric] == pytest.approx(trained[metric], rel=1e-4, abs=1e-6), (trained, metric)


def test_every_validation_logs_paibb_by_size_and_agrees_with_the_analysis(analyzed_run):
    """Training's own PAIBB (every decoder layer, per size and head) of its last evaluation equals what
    sparse-detr-analyze measures on the same images with the same weights (last layer, head mean)."""
    log = read_metrics_log(analyzed_run, prefixes=["paibb/"])
    keys = {key for row in log for key in row if key.startswith("paibb/")}
    assert {f"paibb/all/layer_{l}/{name}" for l in range(2) for name in ("mean", "head_0", "head_3")} <= keys
    assert {key.split("/")[1] for key in keys} <= {"all", "small", "medium", "large"} and len(
        {key.split("/")[1] for key in keys}) >= 2
    last = series(log, "paibb/all/layer_1/mean")[1][-1]
    analysis = json.loads((analyzed_run / "analysis" / "analysis.json").read_text())
    assert last == pytest.approx(analysis["summary"]["cross"]["paibb"], rel=1e-5)
    # and analyze's own table by size holds the same numbers as the log, size by size
    by_size = {(r["size"], r["head"]): float(r["paibb"]) for r in read_csv(analyzed_run / "analysis" / "paibb_by_size.csv")}
    logged = {(key.split("/")[1], key.split("/")[3].removeprefix("head_")): series(log, key)[1][-1]
              for key in keys if "/layer_1/" in key}
    assert by_size == pytest.approx(logged, rel=1e-5, nan_ok=True)


def test_analyze_reproduces_the_training_evaluation(analyzed_run):
    """Same weights, images and batches as the run's last evaluation: same AP and sparsity."""
    result = json.loads((analyzed_run / "analysis" / "analysis.json").read_text())
    evaluation = json.loads((analyzed_run / "eval_metrics.json").read_text())
    assert result["coco"]["AP"] == pytest.approx(evaluation["AP"], abs=1e-9)
    log = read_metrics_log(analyzed_run)
    means = {(r["site"], int(r["layer"])): r for r in result["sparsity"] if r["head"] == "mean"}
    for (site, layer), row in means.items():
        for metric in ("zero_ratio", "gini", "entropy"):
            logged = series(log, f"sparsity/{site}/layer_{layer}/{metric}")[1][-1]
            assert row[metric] == pytest.approx(logged, rel=1e-5, abs=1e-7), (site, layer, metric)


def test_analyze_rejects_bad_inputs_before_any_work(trained_run, tmp_path):
    command = [sys.executable, "-m", "sparse_detr.analyze", f"checkpoint={tmp_path / 'nope.pth'}"]
    result = run(command, tmp_path, check=False)
    assert result.returncode == 2 and "nope.pth" in result.stderr and "no such file" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no Hydra output folder, no log file
    for override, message in [("split=test", "choose one of: train, val"), ("paibb_layers=[2]", "paibb_layers[]=2"),
                              ("figures.images=[16]", "figures.images[]=16"), ("figures.formats=[gif]", "gif")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            sparse_detr.analyze.analyze(load_config([f"checkpoint={trained_run}", override, f"output_dir={tmp_path}/x"],
                                                    config_name="analyze"))
    assert not (tmp_path / "x").exists()


def fake_run(folder: Path, *, attention: str, placement: str, seed: int, ap: float, cross_zero: tuple[float, float],
             learned: dict | None = None):
    """A run folder as the trainer leaves it, by hand: config.yaml, eval_metrics.json, metrics.jsonl (1 h).
    learned: the final `<name>/<site>/layer_<l>/head_<h>` values of a TVMax run that learns lambda
    (logged at steps 10 and 40, halved at 10)."""
    mapping = {"encoder": "softmax", "decoder": "softmax", "cross": attention if placement == "cross" else "softmax"}
    config = {"seed": seed, "attention": {"name": attention, "alpha": 1.5, "learn_alpha": False, "tv_lambda": 0.1,
                                          "learn_lambda": bool(learned)},
              "placement": {"name": placement, **mapping}, "backbone": {"name": "resnet50"}, "data": {"name": "coco"}}
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    (folder / "eval_metrics.json").write_text(json.dumps({"AP": ap, "AP50": ap + 0.2, "APl": None, "epoch": 2}))
    learned = learned or {}
    lines = [{"global_step": 10, "train-metrics/loss_bbox_unscaled": 0.5, "time": 1000.0,
              **{key: value / 2 for key, value in learned.items()}},
             {"global_step": 20, "sparsity/cross/layer_0/zero_ratio": 0.99, "time": 2000.0},  # an older evaluation
             {"global_step": 40, **{f"sparsity/cross/layer_{i}/zero_ratio": z for i, z in enumerate(cross_zero)},
              "sparsity/encoder/layer_0/zero_ratio": 0.0, "time": 4000.0, **learned},
             {"epoch": 2, "val-epoch-metrics/AP": ap, "time": 4600.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"global_st')


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    sparse = {"attention": "sparsemax", "placement": "cross"}
    fake_run(root / "sparsemax_cross" / "seed1", **sparse, seed=1, ap=0.30, cross_zero=(0.5, 0.7))
    fake_run(root / "sparsemax_cross" / "seed2", **sparse, seed=2, ap=0.34, cross_zero=(0.6, 0.8))
    fake_run(root / "softmax" / "seed1", attention="softmax", placement="none", seed=1, ap=0.28, cross_zero=(0, 0))
    # sparsemax placed nowhere is the softmax baseline: a second seed of that variant
    fake_run(root / "sparsemax_none" / "seed2", attention="sparsemax", placement="none", seed=2, ap=0.29,
             cross_zero=(0, 0))
    (root / "notes").mkdir()
    return root


def test_run_folders_are_found_recursively_and_logs_read_robustly(sweep):
    folders = find_run_folders([sweep, sweep / "softmax"])
    assert [f.relative_to(sweep.resolve()).as_posix() for f in folders] == [
        "softmax/seed1", "sparsemax_cross/seed1", "sparsemax_cross/seed2", "sparsemax_none/seed2"]
    log = read_metrics_log(folders[1])  # the torn last line is skipped
    assert len(log) == 4 and training_time_s(log) == 3600.0
    assert read_metrics_log(folders[1], prefixes=["val-epoch-metrics/"])[1] == {"global_step": 20, "time": 2000.0}


def test_report_table_aggregates_seeds_per_variant(sweep, tmp_path):
    out = sparse_detr.report.report(load_config([f"sweep_dir={sweep}", f"output_dir={tmp_path / 'report'}"],
                                                config_name="report"))
    variants = read_csv(out / "report.csv")
    assert [(v["attention"], v["placement"], v["runs"], v["seeds"]) for v in variants] == [
        ("softmax", "none", "2", "1;2"), ("sparsemax", "cross", "2", "1;2")]
    baseline, sparse = variants
    assert float(sparse["AP"]) == pytest.approx(0.32) and float(sparse["AP_std"]) == pytest.approx(math.sqrt(0.0008))
    assert float(sparse["cross/zero_ratio"]) == pytest.approx(0.65)  # per run: mean of the last evaluation's layers
    assert float(sparse["cross/zero_ratio_std"]) == pytest.approx(math.sqrt(0.005))
    assert float(baseline["AP"]) == pytest.approx(0.285) and float(baseline["train_time_s"]) == 3600.0
    assert math.isnan(float(sparse["APl"])) and math.isnan(float(sparse["cross/paibb"]))  # null AP, no analysis
    assert len(read_csv(out / "runs.csv")) == 4
    table = (out / "report.md").read_text()
    assert "| sparsemax | cross | resnet50 | coco | 2 | 0.320 ± 0.028 | 0.520 ± 0.028 |" in table
    # first table: against the softmax baseline, paired by seed (0.30-0.28, 0.34-0.29)
    first = table.index("| attention | placement | backbone | data | seeds | AP | ΔAP vs softmax")
    assert first < table.index("## Every metric")
    assert "| sparsemax | cross | resnet50 | coco | 1;2 | 0.320 ± 0.028 | 0.035 ± 0.021 (n=2) | 0.028 | above |" in table
    assert "60.0 ± 0.0 min" in table and "![training_curves](figures/training_curves.png)" in table
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"AP_vs_zero_ratio.png", "AP_vs_zero_ratio.pdf", "training_curves.png"} <= figures


def test_report_end_to_end_reads_the_analysis_of_a_real_run(analyzed_run, sweep, tmp_path):
    out = sparse_detr.report.report(load_config(
        [f"sweep_dir={sweep}", f"runs=[{analyzed_run}]", f"output_dir={tmp_path / 'report'}", "formats=[png]",
         "attention_image=0"], config_name="report"))
    runs = {Path(r["run"]).name: r for r in read_csv(out / "runs.csv")}
    real = runs["alpha_cross"]
    analysis = json.loads((analyzed_run / "analysis" / "analysis.json").read_text())
    assert real["attention"] == "alpha_entmax (learned, init 1.5)" and real["sparsity_from"] == "analysis"
    assert float(real["cross/paibb"]) == pytest.approx(analysis["summary"]["cross"]["paibb"])
    assert float(real["AP"]) == pytest.approx(json.loads((analyzed_run / "eval_metrics.json").read_text())["AP"])
    assert float(real["train_time_s"]) > 0
    assert len(read_csv(out / "report.csv")) == 3
    # the learned alphas of the real run: its 2 layers x 4 heads, as the analysis read them off the model
    alphas = {(r["layer"], r["head"]): float(r["alpha"]) for r in read_csv(out / "alphas.csv")}
    assert alphas == pytest.approx({(str(l), str(h)): analysis["alphas"][f"alpha/cross/layer_{l}/head_{h}"]
                                    for l in range(2) for h in range(4)})
    text = (out / "report.md").read_text()
    assert "![cross_attention_image_0_object_0](figures/cross_attention_image_0_object_0.png)" in text
    assert (out / "figures" / "cross_attention_image_0_object_0.png").stat().st_size > 0
    assert "## Sparsity at initialisation" in text
    assert "| alpha_entmax (learned, init 1.5) · cross · tiny · shapes | at initialisation | " in text
    assert "![alphas_alpha_entmax_learned_init_1.5_cross_tiny_shapes](figures/alphas_alpha_entmax_learned_init_1.5_cross_tiny_shapes.png)" \
        in text
    assert "## Learned alpha" in text and "| alpha_entmax (learned, init 1.5) · cross · tiny · shapes | 8 |" in text
    # per-class AP of the real run's final evaluation, one row per shapes class
    eval_metrics = json.loads((analyzed_run / "eval_metrics.json").read_text())
    classes = {k.split("/", 1)[1]: v for k, v in eval_metrics.items() if k.startswith("AP_class/")}
    num_categories = OmegaConf.load(analyzed_run / "config.yaml").data.num_categories
    assert len(classes) == num_categories and "## AP per class" in text
    per_class = {row["class"]: row for row in read_csv(out / "per_class_AP.csv")}
    column = "alpha_entmax (learned, init 1.5) · cross · tiny · shapes"
    assert {name: float(row[column]) for name, row in per_class.items()} == pytest.approx(classes, nan_ok=True)


def test_report_cli_rejects_bad_inputs_naming_the_value(tmp_path):
    command = [sys.executable, "-m", "sparse_detr.report", f"sweep_dir={tmp_path / 'missing'}"]
    result = run(command, tmp_path, check=False)
    assert result.returncode == 2 and "sweep_dir=" in result.stderr and "no such folder" in result.stderr
    for override, message in [("curves=[val/AP]", "not a logged metric"), ("metrics=[mAP]", "choose one of: AP"),
                              ("scatter_metric=entropy", "scatter_metric"), ("runs=[]", "sweep_dir=FOLDER or runs")]:
        overrides = [override] if override.startswith("runs") else [f"sweep_dir={tmp_path}", override]
        with pytest.raises(ConfigError, match=re.escape(message)):
            sparse_detr.report.report(load_config(overrides, config_name="report"))
    with pytest.raises(ConfigError, match="no run folders"):
        sparse_detr.report.report(load_config([f"sweep_dir={tmp_path}"], config_name="report"))


def test_report_flags_the_variant_whose_seeds_came_from_different_commits(sweep, tmp_path):
    from sparse_detr.provenance import record_provenance

    clean = {"git_dirty": False, "python": "3.11.9", "torch": "2.14.1", "cuda": None, "host": "n1"}
    for run_dir, commit in [("softmax/seed1", "a" * 40), ("sparsemax_none/seed2", "a" * 40),
                            ("sparsemax_cross/seed1", "a" * 40), ("sparsemax_cross/seed2", "b" * 40)]:
        record_provenance(sweep / run_dir, {**clean, "git_commit": commit})
    out = sparse_detr.report.report(load_config([f"sweep_dir={sweep}", f"output_dir={tmp_path / 'report'}",
                                                 "formats=[png]", "curves=[]"], config_name="report"))
    variants = {v["attention"]: v for v in read_csv(out / "report.csv")}
    assert variants["softmax"]["code"] == "a" * 40 and variants["sparsemax"]["code"] == f"{'a' * 40};{'b' * 40}"
    text = (out / "report.md").read_text()
    assert "Code differs within a variant" in text
    assert f"- sparsemax · cross · resnet50 · coco: {'a' * 12}, {'b' * 12}" in text and "- softmax" not in text


def test_report_shows_the_final_learned_lambdas_of_tvmax_runs_mean_over_seeds(sweep, tmp_path):
    def lambdas(offset):
        return {f"lambda/cross/layer_{l}/head_{h}": 0.1 * (1 + l * 2 + h) + offset for l in range(2) for h in range(2)}

    tvmax = {"attention": "tvmax", "placement": "cross", "cross_zero": (0.8, 0.9)}
    fake_run(sweep / "tvmax_cross" / "seed1", **tvmax, seed=1, ap=0.31, learned=lambdas(0.0))
    fake_run(sweep / "tvmax_cross" / "seed2", **tvmax, seed=2, ap=0.33, learned=lambdas(0.2))
    out = sparse_detr.report.report(load_config([f"sweep_dir={sweep}", f"output_dir={tmp_path / 'report'}",
                                                 "formats=[png]", "curves=[]"], config_name="report"))
    variant = "tvmax (learned, init 0.1) · cross · resnet50 · coco"
    rows = read_csv(out / "lambdas.csv")
    assert {row["variant"] for row in rows} == {variant}
    # the last logged value of each head, mean of the two seeds: 0.1 * (1 + 2 l + h) + 0.1
    assert {(row["site"], row["layer"], row["head"]): float(row["lambda"]) for row in rows} == pytest.approx(
        {("cross", str(l), str(h)): 0.1 * (1 + 2 * l + h) + 0.1 for l in range(2) for h in range(2)})
    assert not (out / "alphas.csv").exists()   # no run learned alpha
    text = (out / "report.md").read_text()
    assert "## Learned lambda" in text and "## Learned alpha" not in text
    assert f"| {variant} | 8 | 0.100 | 0.350 | 0.600 |" in text and "| cross | 1 | 0.400 | 0.500 |" in text
    stem = "lambdas_tvmax_learned_init_0.1_cross_resnet50_coco"
    assert f"![{stem}](figures/{stem}.png)" in text and (out / "figures" / f"{stem}.png").stat().st_size > 0


def test_one_objects_attention_is_the_head_average_of_its_matched_query(analyzed_run):
    import numpy as np

    from sparse_detr.analysis.variant_attention import object_attention

    picture, box, maps = object_attention(analyzed_run, 0, 0)
    height, width = picture.shape[:2]
    assert maps.shape[0] == 2 and maps.min() >= 0
    np.testing.assert_allclose(maps.sum((1, 2)), 1.0, atol=1e-5)   # a distribution over the image's cells
    assert 0 <= box[0] < box[2] <= width + 1e-3 and 0 <= box[1] < box[3] <= height + 1e-3
    with pytest.raises(ConfigError, match="attention_object=99 is out of range"):
        object_attention(analyzed_run, 0, 99)
