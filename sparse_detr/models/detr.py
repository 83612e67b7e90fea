"""DETR: backbone + transformer + class and box heads, and the post-processor to image boxes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from sparse_detr.data import num_classes
from sparse_detr.data.collate import pad_images
from sparse_detr.matching.criterion import build_criterion
from sparse_detr.models.backbone import Joiner, build_backbone
from sparse_detr.models.mappings import MAPPINGS
from sparse_detr.models.transformer import Transformer
from sparse_detr.sites import SITES


class MLP(nn.Module):
    """A plain multi-layer perceptron with ReLU between layers (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True):
        """num_classes: label indices run over [0, num_classes); one more logit is "no object"."""
        super().__init__()
        hidden_dim = transformer.d_model
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.num_queries = num_queries
        self.aux_loss = aux_loss

    def forward(self, images: torch.Tensor | list[torch.Tensor], mask: torch.Tensor | None = None,
                return_attention: bool = False) -> dict:
        """images: a list of [3, H_i, W_i] tensors, or a padded batch [B, 3, H, W] with its mask
        [B, H, W] (True on padding; None means no padding).

        Returns `pred_logits` [B, num_queries, num_classes + 1], `pred_boxes` [B, num_queries, 4]
        (normalised cxcywh), `aux_outputs` (the same for every decoder layer but the last) and,
        with return_attention, `attention` {site: [per layer [B, heads, queries, keys]]} and
        `feature_mask` [B, h, w], the padding of the feature map the keys index.
        """
        if isinstance(images, (list, tuple)):
            images, mask = pad_images(list(images))
        elif mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        features, feature_mask, pos = self.backbone(images, mask)
        hs, _, attention = self.transformer(
            self.input_proj(features), feature_mask, self.query_embed.weight, pos, need_weights=return_attention
        )
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes} for logits, boxes in zip(outputs_class[:-1], outputs_coord[:-1])
            ]
        if return_attention:
            out["attention"] = attention
            out["feature_mask"] = feature_mask
        return out


class PostProcess(nn.Module):
    """Model outputs -> per image scores, labels and absolute xyxy boxes in original pixels."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """target_sizes [B, 2] holds each image's (height, width) to scale the boxes to."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"{len(logits)} outputs but {len(target_sizes)} target sizes")
        scores, labels = F.softmax(logits, -1)[..., :-1].max(-1)
        height, width = target_sizes.unbind(1)
        scale = torch.stack([width, height, width, height], dim=1).to(boxes.dtype)
        xyxy = box_convert(boxes, "cxcywh", "xyxy") * scale[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy)]


def site_mapping_factories(cfg) -> dict:
    """One factory per site: the kind named by `placement.<site>`, built from `attention.*`."""
    def factory(name: str):
        return lambda: MAPPINGS[name].from_config(cfg.attention, cfg.model.nheads)

    return {site: factory(cfg.placement[site]) for site in SITES}


def resolve_num_classes(cfg) -> int:
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    return num_classes(cfg.data)


def build_model(cfg) -> tuple[DETR, nn.Module, PostProcess]:
    """cfg (the composed config) -> (model, criterion, postprocessor)."""
    train_backbone = cfg.optim.lr_backbone > 0 if "optim" in cfg else True
    backbone = build_backbone(cfg.backbone, cfg.model, train_backbone)
    transformer = Transformer(
        d_model=cfg.model.hidden_dim,
        nhead=cfg.model.nheads,
        num_encoder_layers=cfg.model.enc_layers,
        num_decoder_layers=cfg.model.dec_layers,
        dim_feedforward=cfg.model.dim_feedforward,
        dropout=cfg.model.dropout,
        normalize_before=cfg.model.pre_norm,
        site_mappings=site_mapping_factories(cfg),
    )
    num_classes = resolve_num_classes(cfg)
    model = DETR(backbone, transformer, num_classes, cfg.model.num_queries, cfg.model.aux_loss)
    criterion = build_criterion(cfg.loss, num_classes, cfg.model.dec_layers, cfg.model.aux_loss)
    return model, criterion, PostProcess()
