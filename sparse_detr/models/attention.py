"""Multi-head attention with a pluggable mapping from scores to weights.

Parameter names and layout (`in_proj_weight`, `in_proj_bias`, `out_proj`) and the sequence-first
tensor layout are those of `torch.nn.MultiheadAttention`, so DETR's weights load unchanged and
the softmax mapping gives the torch module's numbers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparse_detr.models.mappings.base import Softmax, keys_to_drop


class MultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, mapping: nn.Module | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.mapping = mapping if mapping is not None else Softmax()
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[L, B, E] -> [B, heads, L, head_dim]."""
        length, batch, _ = x.shape
        return x.reshape(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        key_grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query [L, B, E], key/value [S, B, E], key_padding_mask [B, S] (True = padding);
        key_grid (H, W) when the S keys are a feature map flattened row-major (H * W = S).

        Returns the output [L, B, E] and, with need_weights, the per-head weights [B, heads, L, S]
        (before dropout; never averaged over heads).
        """
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q)) * (1.0 / math.sqrt(self.head_dim))
        k = self._split_heads(F.linear(key, w_k, b_k))
        v = self._split_heads(F.linear(value, w_v, b_v))
        if need_weights or not self.training or type(self.mapping) is not Softmax:
            weights = self.mapping(q @ k.transpose(-2, -1), key_padding_mask=key_padding_mask, key_grid=key_grid)
            attended = F.dropout(weights, p=self.dropout, training=self.training) @ v
        else:
            weights, attended = None, self._fused_softmax_attention(q, k, v, key_padding_mask)
        out = attended.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.embed_dim)
        return self.out_proj(out), (weights if need_weights else None)

    def _fused_softmax_attention(self, q, k, v, key_padding_mask):
        """softmax(q k^T) v in one `F.scaled_dot_product_attention` call, in training with softmax
        (8% of a small model's training step on a CPU; flash kernels on a GPU). It equals the
        explicit path to rounding; evaluation keeps the explicit path, so outputs with and without
        the weights stay equal bit for bit. Padding is handled as the mappings do (`keys_to_drop`): a row whose
        keys are all padded gets zeros, not NaN."""
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, scale=1.0)
        dropped, empty = keys_to_drop(key_padding_mask)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=~dropped, dropout_p=self.dropout, scale=1.0)
        return attended.masked_fill(empty, 0.0)
