"""`sparse-detr-analyze`: where and how sparse a trained model's attention is, in tables and figures.

    sparse-detr-analyze checkpoint=outputs/run/checkpoint.pth          # or checkpoint=outputs/run
    sparse-detr-analyze checkpoint=RUN split=train max_images=200 threshold=1e-4 paibb_layers=[0,1,2,3,4,5]
    sparse-detr-analyze checkpoint=RUN figures.images=[0,7] figures.queries=[3,42] figures.score_threshold=0.3
    sparse-detr-analyze checkpoint=RUN 'overrides=["data.root=/data/coco"]' output_dir=/tmp/analysis

The model is rebuilt from the config saved in the checkpoint. Writes into `output_dir` (default
`<run folder>/analysis/`): sparsity.csv, paibb.csv, analysis.json, summary.md and figures/.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sparse_detr.checks import check_choice, check_range
from sparse_detr.config import ConfigError, config_dir, exit_on_bad_overrides, reports_config_errors, validate
from sparse_detr.run_folder import ANALYSIS_NAME, analysis_dir, checkpoint_file, write_json
from sparse_detr.sites import SITES
from sparse_detr.tracking import ALPHA
from sparse_detr.data import SPLITS


@dataclass
class FiguresConfig:
    enabled: bool = True
    images: List[int] = field(default_factory=lambda: [0, 1])  # indices into the split
    queries: Optional[List[int]] = None  # None: the Hungarian-matched queries of each image
    max_queries: int = 4                 # at most this many matched queries per image
    score_threshold: float = 0.5         # predicted boxes drawn at or above this score
    formats: List[str] = field(default_factory=lambda: ["png", "pdf"])
    dpi: int = 100

    def __post_init__(self):
        from sparse_detr.viz import FORMATS

        for index in self.images:
            check_range("figures.images[]", index, low=0)
        for query in self.queries or ():
            check_range("figures.queries[]", query, low=0)
        check_range("figures.max_queries", self.max_queries, low=1)
        check_range("figures.score_threshold", self.score_threshold, low=0.0, high=1.0)
        for fmt in self.formats:
            check_choice("figures.formats[]", fmt, FORMATS)
        check_range("figures.dpi", self.dpi, low=10)


@dataclass
class AnalyzeConfig:
    checkpoint: str = MISSING            # a checkpoint.pth, or the run folder holding one
    split: str = "val"
    output_dir: Optional[str] = None     # None: <run folder>/analysis
    max_images: Optional[int] = None     # the first N images of the split (None: all)
    batch_size: Optional[int] = None     # None: the run's data.batch_size
    device: str = "auto"                 # auto (CUDA when visible) | cpu | cuda
    threshold: float = 1e-6              # weights <= threshold count as near zero (near_zero_ratio)
    paibb_layers: List[int] = field(default_factory=lambda: [-1])  # decoder layers; -1 is the last
    overrides: List[str] = field(default_factory=list)  # changes to the run's config, e.g. [data.root=/data/coco]
    init_reference: bool = True          # also measure the model as training started it (sparsity_init.csv)
    figures: FiguresConfig = field(default_factory=FiguresConfig)

    def __post_init__(self):  # (the checkpoint is checked by `analyze`: a run may check these before it has one)
        check_choice("split", self.split, SPLITS)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_range("threshold", self.threshold, low=0.0)
        for key in ("max_images", "batch_size"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), low=1)
        if not self.paibb_layers:
            raise ConfigError("paibb_layers=[] is empty; give decoder layers, e.g. [-1] (the last)")


ConfigStore.instance().store(name="analyze_schema", node=AnalyzeConfig)
INIT_METRICS = ("zero_ratio", "gini")   # shown beside the trained values in summary.md


def check_against_run(args: AnalyzeConfig, cfg, dataset_size: int) -> None:
    """The checks that need the run's config: layer, query and image indices."""
    layers, queries = cfg.model.dec_layers, cfg.model.num_queries
    for layer in args.paibb_layers:
        check_range("paibb_layers[]", layer, low=-layers, high=layers - 1)
    for query in args.figures.queries or ():
        check_range("figures.queries[]", query, low=0, high=queries - 1)
    for index in args.figures.images if args.figures.enabled else ():
        check_range("figures.images[]", index, low=0, high=dataset_size - 1)


def analyze(cfg: DictConfig) -> Path:
    """Validate, run the model over the split, write the tables, figures and summary; returns the folder."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is required: sparse-detr-analyze checkpoint=RUN_FOLDER[/checkpoint.pth]")
    args: AnalyzeConfig = validate(cfg)
    args.checkpoint = checkpoint_file(args.checkpoint)
    from sparse_detr.analysis import attention_stats as stats_lib  # heavy imports after the config is known good
    from sparse_detr.analysis.tables import write_csv
    from sparse_detr.data import evaluation_dataset
    from sparse_detr.engine.distributed import choose_device
    from sparse_detr.engine.loop import learned_mapping_values
    from sparse_detr.engine.trained_model import load_trained_model

    device = choose_device(args.device, 0)
    trained = load_trained_model(args.checkpoint, args.overrides, device, command="sparse-detr-analyze")
    dataset = evaluation_dataset(trained.checked.data, args.split)
    check_against_run(args, trained.cfg, len(dataset))
    run_dir = Path(args.checkpoint).parent
    out = Path(args.output_dir) if args.output_dir else analysis_dir(run_dir)

    stats = stats_lib.measure(trained.model, trained.criterion, trained.postprocessor, dataset,
                              num_images=args.max_images, batch_size=args.batch_size or trained.cfg.data.batch_size,
                              threshold=args.threshold, paibb_layers=args.paibb_layers, device=device)
    sparsity, paibb = stats_lib.sparsity_rows(stats), stats_lib.paibb_rows(stats)
    learned = learned_mapping_values(trained.model)
    alphas = {key: value for key, value in learned.items() if key.startswith(ALPHA + "/")}
    write_csv(out / "sparsity.csv", sparsity, stats_lib.SPARSITY_COLUMNS)
    write_csv(out / "paibb.csv", paibb, stats_lib.PAIBB_COLUMNS)
    paibb_by_size = stats_lib.paibb_size_rows(stats)
    write_csv(out / "paibb_by_size.csv", paibb_by_size, stats_lib.PAIBB_SIZE_COLUMNS)
    init = None
    if args.init_reference:  # how much of the sparsity is learned: the same images through the initial model
        initial = stats_lib.measure(stats_lib.initial_model(trained, device), trained.criterion, trained.postprocessor,
                                    dataset, num_images=args.max_images,
                                    batch_size=args.batch_size or trained.cfg.data.batch_size,
                                    threshold=args.threshold, paibb_layers=args.paibb_layers, device=device)
        init = {"summary": stats_lib.summary_of(initial), "sparsity": stats_lib.sparsity_rows(initial),
                "paibb": stats_lib.paibb_rows(initial)}
        write_csv(out / "sparsity_init.csv", init["sparsity"], stats_lib.SPARSITY_COLUMNS)
    write_json(out / ANALYSIS_NAME, {
        "checkpoint": args.checkpoint, "split": args.split, "num_images": stats.num_images,
        "threshold": args.threshold, "epoch": trained.state.get("epoch"),
        "global_step": trained.state.get("global_step"), "coco": stats.coco, "summary": stats_lib.summary_of(stats),
        "sparsity": sparsity, "paibb": paibb, "paibb_by_size": paibb_by_size, "alphas": alphas, "learned": learned, "init": init,
    })
    figures = []
    if args.figures.enabled:
        from sparse_detr.viz.analysis_figures import analysis_figures

        figures = analysis_figures(trained, dataset, stats, learned, run_dir, out / "figures", args.figures, device)
    summary = summary_markdown(trained, args, stats, alphas, [p.relative_to(out) for p in figures], init)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    print(f"analysis folder: {out.resolve()}")
    return out


def summary_markdown(trained, args: AnalyzeConfig, stats, alphas: dict[str, float], figures: list[Path],
                     init: dict | None = None) -> str:
    """summary.md: what was analysed, COCO metrics, head-mean sparsity per site and layer, PAIBB, alphas, figures."""
    from sparse_detr.analysis.tables import markdown_table
    from sparse_detr.metrics.names import METRIC_NAMES
    from sparse_detr.metrics.sparsity import METRICS
    from sparse_detr.viz.alphas import alpha_grids

    cfg, state = trained.cfg, trained.state
    initial = {(r["site"], r["layer"]): r for r in (init or {}).get("sparsity", []) if r["head"] == "mean"}
    mappings = ", ".join(f"{site}={cfg.placement[site]}" for site in SITES)
    alpha = f" (alpha {'learned, init ' if cfg.attention.learn_alpha else ''}{cfg.attention.alpha})" \
        if "alpha_entmax" in mappings else ""
    lines = [
        f"# Attention analysis of `{args.checkpoint}`",
        "",
        f"- trained: epoch {state.get('epoch')}, global step {state.get('global_step')}; backbone {cfg.backbone.name}, "
        f"data {cfg.data.name}",
        f"- mappings: {mappings}{alpha}",
        f"- split `{args.split}`, {stats.num_images} images; near-zero threshold {args.threshold:g}",
        "",
        "## COCO box metrics on these images",
        "",
        markdown_table(METRIC_NAMES[:6], [[stats.coco[name] for name in METRIC_NAMES[:6]]]),
        "",
        "## Sparsity per site and layer (mean over heads; per head in sparsity.csv)",
        "",
        "The `(init)` columns: the same model as training started it (same seed), on the same images "
        "(sparsity_init.csv): the part of the sparsity that was not learned." if init else "",
        "",
        markdown_table(["site", "layer", "mapping", *METRICS, *((f"{m} (init)" for m in INIT_METRICS) if init else ())],
                       [[site, layer, cfg.placement[site], *(float(values[m].mean()) if m in values else None for m in METRICS),
                         *((initial[site, layer][m] for m in INIT_METRICS) if init else ())]
                        for (site, layer), values in stats.sparsity.items()]),
        "",
        "## PAIBB: share of cross-attention inside the matched ground-truth box",
        "",
    ]
    heads = cfg.model.nheads
    lines.append(markdown_table(
        ["layer", "pairs", "mean", *(f"head {h}" for h in range(heads))],
        [[layer, len(pairs), float(pairs.nanmean()), *pairs.nanmean(0).tolist()]
         for layer, pairs in stats.paibb.items()]))
    if alphas:
        lines += ["", "## Learned alpha per layer and head", ""]
        rows = [[site, layer, *grid[layer].tolist()]
                for site, grid in alpha_grids(alphas).items() for layer in range(len(grid))]
        lines.append(markdown_table(["site", "layer", *(f"head {h}" for h in range(heads))], rows))
    if figures:
        lines += ["", "## Figures", ""] + [f"- [{path}]({path})" for path in figures if path.suffix == ".png"]
    return "\n".join(lines) + "\n"


@hydra.main(config_path=str(config_dir()), config_name="analyze", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> None:
    analyze(cfg)


def main() -> None:
    exit_on_bad_overrides("analyze", sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
