"""DETR's 2-D position encodings of the feature map: fixed sine or learned row/column tables."""
from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine of normalised (y, x) over the unpadded area, as in "Attention is all you need"."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000, normalize: bool = True):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, h, w] (True on padding) -> [B, 2 * num_pos_feats, h, w]."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned tables of 50 rows and 50 columns, concatenated."""

    def __init__(self, num_pos_feats: int = 128):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, h, w] -> [B, 2 * num_pos_feats, h, w]; h and w at most 50."""
        h, w = mask.shape[-2:]
        if h > 50 or w > 50:
            raise ValueError(f"learned position encoding covers at most 50x50 feature cells, got {h}x{w}")
        x_emb = self.col_embed(torch.arange(w, device=mask.device))
        y_emb = self.row_embed(torch.arange(h, device=mask.device))
        pos = torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(mask.shape[0], 1, 1, 1)


def build_position_encoding(kind: str, hidden_dim: int, temperature: float) -> nn.Module:
    """DETR's 10000 spreads the sine frequencies for feature maps of tens of cells a side; on a
    map of a few cells only the first few vary, and a lower temperature gives every one a use."""
    if kind == "sine":
        return PositionEmbeddingSine(hidden_dim // 2, temperature, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"model.position_embedding={kind!r} is not valid; choose one of: sine, learned")
