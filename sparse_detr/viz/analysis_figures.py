"""The figure set of `sparse-detr-analyze`: detections and cross-attention of chosen images,
sparsity bars, PAIBB bars, and the learned mapping parameters (alphas, lambdas: model heatmap,
training trajectories)."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.ops import box_convert

from sparse_detr.analysis.attention_stats import AttentionStats
from sparse_detr.analysis.run_folders import alpha_trajectories
from sparse_detr.metrics.paibb_sizes import matched_pairs
from sparse_detr.data.coco import category_table
from sparse_detr.engine.trained_model import TrainedModel
from sparse_detr.metrics.sparsity import METRICS
from sparse_detr.run_folder import read_metrics_log
from sparse_detr.tracking import LEARNED_GROUPS
from sparse_detr.viz import save_figure
from sparse_detr.viz.alphas import alpha_grids, alpha_heatmap_figure, alpha_trajectories_figure
from sparse_detr.viz.attention_maps import (GT_COLOR, PRED_COLOR, cross_attention_figure, denormalize,
                                            detections_figure, query_attention_maps)
from sparse_detr.viz.sparsity_plots import sparsity_bars_figure


def analysis_figures(trained: TrainedModel, dataset, stats: AttentionStats, learned: dict[str, float], run_dir: Path,
                     out: Path, fig_cfg, device) -> list[Path]:
    """Draw every figure into `out`; returns the paths written (fig_cfg: analyze's FiguresConfig;
    learned: `engine.loop.learned_mapping_values` of the model)."""
    def save(figure, name):
        paths.extend(save_figure(figure, out / name, fig_cfg.formats, fig_cfg.dpi))

    paths: list[Path] = []
    for index in fig_cfg.images:
        for name, figure in image_figures(trained, dataset, index, fig_cfg, device):
            save(figure, name)
    for metric in METRICS:
        per_head = {key: values[metric] for key, values in stats.sparsity.items() if metric in values}  # grid sites only for some
        if per_head:
            save(sparsity_bars_figure(per_head, metric), f"sparsity_{metric}")
    if stats.paibb:
        per_head = {("cross", layer): pairs.nanmean(0) for layer, pairs in stats.paibb.items()}
        save(sparsity_bars_figure(per_head, "PAIBB"), "paibb")
    for group in LEARNED_GROUPS:   # figures `alphas`, `alpha_trajectories`, `lambdas`, `lambda_trajectories`
        values = {key: value for key, value in learned.items() if key.startswith(group + "/")}
        if values:
            save(alpha_heatmap_figure(alpha_grids(values), group), f"{group}s")
        trajectories = alpha_trajectories(read_metrics_log(run_dir, prefixes=[group + "/"]), group)
        if trajectories:
            save(alpha_trajectories_figure(trajectories, group), f"{group}_trajectories")
    return paths


@torch.no_grad()
def image_figures(trained: TrainedModel, dataset, index: int, fig_cfg, device):
    """(name, figure) pairs for one image, run alone: its detections, then the cross-attention of
    each chosen query (default: the matched ones) with its predicted and matched boxes."""
    image, target = dataset[index]
    target = {key: value.to(device) for key, value in target.items()}
    outputs = trained.model([image.to(device)], return_attention=True)
    height, width = target["size"].tolist()
    picture = denormalize(image)[:height, :width]
    result = trained.postprocessor(outputs, target["size"][None])[0]  # boxes in the shown image's pixels

    def pixels(boxes):  # normalised cxcywh -> xyxy pixels of the shown image
        return (box_convert(boxes, "cxcywh", "xyxy") * boxes.new_tensor([width, height] * 2)).tolist()

    names = {label: category["name"] for label, category in enumerate(category_table(dataset))}

    def predicted(query: int) -> tuple:
        score, label = float(result["scores"][query]), int(result["labels"][query])
        return result["boxes"][query].tolist(), PRED_COLOR, f"q{query} {names.get(label, label)} {score:.2f}"

    image_id = int(target["image_id"])
    truth = [(box, GT_COLOR, names.get(label, ""))
             for box, label in zip(pixels(target["boxes"]), target["labels"].tolist())]
    shown = [q for q in range(len(result["scores"])) if result["scores"][q] >= fig_cfg.score_threshold]
    title = f"image {image_id}: ground truth (green), predictions with score >= {fig_cfg.score_threshold} (red)"
    yield f"image_{image_id}_detections", detections_figure(picture, truth + [predicted(q) for q in shown], title)

    (queries, boxes), = matched_pairs(trained.criterion, outputs, [target])
    match = dict(zip(queries.tolist(), pixels(boxes)))
    chosen = fig_cfg.queries if fig_cfg.queries is not None else sorted(match)[:fig_cfg.max_queries]
    for query in chosen:
        marked = [predicted(query)] + ([(match[query], GT_COLOR, "matched")] if query in match else [])
        title = f"image {image_id}, query {query}: decoder cross-attention per layer and head"
        yield (f"image_{image_id}_query_{query}_cross_attention",
               cross_attention_figure(picture, query_attention_maps(outputs, query), marked, title))
