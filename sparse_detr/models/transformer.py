"""DETR's encoder-decoder transformer, with one attention mapping per site.

Sites (`sparse_detr.sites`): `encoder` (encoder self-attention), `decoder` (decoder
self-attention) and `cross` (decoder cross-attention). Post-norm by default as in DETR, pre-norm on request; the decoder
returns every layer's output for the auxiliary losses.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparse_detr.models.attention import MultiheadAttention
from sparse_detr.sites import SITES

MappingFactory = Callable[[], nn.Module]
# Where each site's attention module sits: (the stack of layers, the layer's attribute).
SITE_MODULES = {"encoder": ("encoder", "self_attn"), "decoder": ("decoder", "self_attn"),
                "cross": ("decoder", "multihead_attn")}


def with_pos(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


def grid_kwargs(attention: nn.Module, grid: tuple[int, int] | None) -> dict:
    """`key_grid` for our attention; none for torch.nn.MultiheadAttention, which stays a drop-in
    replacement (the softmax model is compared with it module for module)."""
    return {"key_grid": grid} if isinstance(attention, MultiheadAttention) else {}


class ResidualLayer(nn.Module):
    """What encoder and decoder layers share: DETR's feed-forward block, and residual sub-layers
    normed after the sum (post-norm, DETR's default) or before the sub-layer (pre-norm)."""

    def __init__(self, d_model, dim_feedforward, dropout, normalize_before):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.normalize_before = normalize_before

    def pre(self, x, norm: nn.LayerNorm):
        """The sub-layer's input."""
        return norm(x) if self.normalize_before else x

    def residual(self, x, update, norm: nn.LayerNorm):
        """x + the sub-layer's (dropped-out) update, normed here under post-norm."""
        x = x + update
        return x if self.normalize_before else norm(x)

    def feedforward(self, x, norm: nn.LayerNorm, dropout_out: nn.Dropout):
        update = self.linear2(self.dropout(F.relu(self.linear1(self.pre(x, norm)))))
        return self.residual(x, dropout_out(update), norm)


class TransformerEncoderLayer(ResidualLayer):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, normalize_before, mapping: nn.Module):
        super().__init__(d_model, dim_feedforward, dropout, normalize_before)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, mapping=mapping)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src, key_padding_mask, pos, need_weights=False, grid=None):
        """src, pos [HW, B, C]; key_padding_mask [B, HW]; grid (H, W) ->
        ([HW, B, C], weights [B, heads, HW, HW] | None)."""
        x = self.pre(src, self.norm1)
        q = k = with_pos(x, pos)
        attended, weights = self.self_attn(q, k, x, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                           **grid_kwargs(self.self_attn, grid))
        src = self.residual(src, self.dropout1(attended), self.norm1)
        return self.feedforward(src, self.norm2, self.dropout2), weights


class TransformerDecoderLayer(ResidualLayer):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, normalize_before,
                 self_mapping: nn.Module, cross_mapping: nn.Module):
        super().__init__(d_model, dim_feedforward, dropout, normalize_before)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, mapping=self_mapping)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, mapping=cross_mapping)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, need_weights=False, grid=None):
        """tgt, query_pos [Q, B, C]; memory, pos [HW, B, C]; grid (H, W) of memory ->
        ([Q, B, C], self weights, cross weights)."""
        x = self.pre(tgt, self.norm1)
        q = k = with_pos(x, query_pos)
        attended, self_weights = self.self_attn(q, k, x, need_weights=need_weights)
        tgt = self.residual(tgt, self.dropout1(attended), self.norm1)
        x = self.pre(tgt, self.norm2)
        attended, cross_weights = self.multihead_attn(
            with_pos(x, query_pos), with_pos(memory, pos), memory,
            key_padding_mask=memory_key_padding_mask, need_weights=need_weights,
            **grid_kwargs(self.multihead_attn, grid),
        )
        tgt = self.residual(tgt, self.dropout2(attended), self.norm2)
        return self.feedforward(tgt, self.norm3, self.dropout3), self_weights, cross_weights


class TransformerEncoder(nn.Module):
    def __init__(self, layers: list[TransformerEncoderLayer], norm: nn.Module | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, src, key_padding_mask, pos, need_weights=False, grid=None):
        weights = []
        for layer in self.layers:
            src, layer_weights = layer(src, key_padding_mask, pos, need_weights, grid)
            weights.append(layer_weights)
        if self.norm is not None:
            src = self.norm(src)
        return src, weights


class TransformerDecoder(nn.Module):
    def __init__(self, layers: list[TransformerDecoderLayer], norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos, need_weights=False, grid=None):
        """-> (every layer's normed output [layers, Q, B, C], self weights, cross weights)."""
        intermediate, self_weights, cross_weights = [], [], []
        for layer in self.layers:
            tgt, layer_self, layer_cross = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, need_weights,
                                                 grid)
            intermediate.append(self.norm(tgt))
            self_weights.append(layer_self)
            cross_weights.append(layer_cross)
        return torch.stack(intermediate), self_weights, cross_weights


class Transformer(nn.Module):
    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, normalize_before=False, site_mappings: dict[str, MappingFactory] | None = None):
        """site_mappings: for `encoder`, `decoder`, `cross`, a factory called once per layer, so
        each layer owns its mapping (and its learned alphas); missing sites use softmax."""
        super().__init__()
        factories = {site: (lambda: None) for site in SITES}  # None: MultiheadAttention's softmax
        factories.update(site_mappings or {})
        self.encoder = TransformerEncoder(
            [TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before, factories["encoder"]())
             for _ in range(num_encoder_layers)],
            nn.LayerNorm(d_model) if normalize_before else None,
        )
        self.decoder = TransformerDecoder(
            [TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before,
                                     factories["decoder"](), factories["cross"]())
             for _ in range(num_decoder_layers)],
            nn.LayerNorm(d_model),
        )
        self.d_model = d_model
        self.nhead = nhead
        self._reset_parameters()

    def site_attention(self):
        """Yield (site, layer index, MultiheadAttention) for every attention module, site by site."""
        for site in SITES:
            stack, attribute = SITE_MODULES[site]
            for index, layer in enumerate(getattr(self, stack).layers):
                yield site, index, getattr(layer, attribute)

    def _reset_parameters(self) -> None:
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, src, mask, query_embed, pos_embed, need_weights=False):
        """src [B, C, h, w], mask [B, h, w], query_embed [Q, C], pos_embed [B, C, h, w] ->
        decoder outputs [layers, B, Q, C], memory [B, C, h, w], and per-site lists of per-layer
        attention weights ([B, heads, queries, keys], or None without need_weights)."""
        batch, channels, height, width = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, batch, 1)
        mask = mask.flatten(1)
        grid = (height, width)  # the keys of the encoder and of the cross-attention
        memory, encoder_weights = self.encoder(src, mask, pos_embed, need_weights, grid)
        hs, decoder_weights, cross_weights = self.decoder(
            torch.zeros_like(query_pos), memory, mask, pos_embed, query_pos, need_weights, grid
        )
        attention = {"encoder": encoder_weights, "decoder": decoder_weights, "cross": cross_weights}
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(batch, channels, height, width), attention
