"""What every mapping kind shares, the registry of kinds, and softmax (DETR's own mapping).

Every mapping, called as `m(scores, key_padding_mask=None)`,
- computes in float32 when the scores are float16/bfloat16 (the sort- and threshold-based
  mappings drift by 1e-2 in half precision) and returns the scores' dtype;
- treats key padding as truncation: padded keys get exactly 0 and the others get what the
  mapping gives on the unpadded keys alone; a row whose keys are all padded returns zeros, with a
  zero gradient (never NaN).
A kind builds itself from the attention config (`from_config`), reading its own parameters, so
the model builder only looks names up here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sparse_detr.config import ALPHA_FLOOR
from sparse_detr.config import MAPPING_IMPLS as IMPLS

__all__ = ["ALPHA_FLOOR", "IMPLS", "MAPPINGS", "AttentionMapping", "Softmax", "attention_mapping",
           "config_value", "keys_to_drop", "register_mapping"]

_HALF = (torch.float16, torch.bfloat16)

MAPPINGS: dict[str, type[AttentionMapping]] = {}  # config name -> kind, in registration order


def register_mapping(kind: type[AttentionMapping]) -> type[AttentionMapping]:
    """Class decorator: make `kind` available under its `name` (a `conf/attention/` stem)."""
    if kind.name in MAPPINGS:
        raise ValueError(f"attention mapping {kind.name!r} is registered twice")
    MAPPINGS[kind.name] = kind
    return kind


def config_value(attention_cfg: Any, key: str, default: Any) -> Any:
    """`attention_cfg.<key>` from a config node, dataclass or plain dict, or `default` if absent."""
    if isinstance(attention_cfg, Mapping):
        return attention_cfg.get(key, default)
    return getattr(attention_cfg, key, default)


def attention_mapping(name: str, *, num_heads: int | None = None, **params) -> nn.Module:
    """Build the mapping `name` (a key of MAPPINGS) from keyword parameters as in the attention
    config (`impl` one of IMPLS, `alpha`, `learn_alpha`, ...); a learned per-head parameter
    needs num_heads."""
    if name not in MAPPINGS:
        raise ValueError(f"unknown attention mapping {name!r}; valid: {', '.join(MAPPINGS)}")
    impl = params.setdefault("impl", "fast")
    if impl not in IMPLS:
        raise ValueError(f"unknown mapping impl {impl!r}; valid: {', '.join(IMPLS)}")
    return MAPPINGS[name].from_config(params, num_heads)


def keys_to_drop(key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key_padding_mask [batch, keys] -> (the keys each row leaves out [batch, 1, 1, keys], the
    images whose keys are all padded [batch, 1, 1, 1]): such an image keeps all its keys, so the
    mapping stays finite, and its output is zeroed afterwards."""
    padded = key_padding_mask[:, None, None, :]
    empty = padded.all(-1, keepdim=True)
    return padded & ~empty, empty


class AttentionMapping(nn.Module):
    """Shared masking and dtype handling; a kind sets `name` and defines `_map(x)` over the last dim.

    `_map` receives padded keys as -inf (only in rows that keep at least one key) and must give
    them 0; fully padded rows are computed as if unpadded and zeroed afterwards, so neither the
    output nor the gradient of such a row can be NaN."""
    name: str  # the config name; registered by @register_mapping
    needs_grid = False  # True: `_map(x, grid)` needs the key grid, so only sites whose keys are the feature map
    # The names of the per-head values it may learn (`alpha`, `lambda`): each is logged as
    # `<name>/<site>/layer_<l>/head_<h>` (a group of `tracking.LEARNED_GROUPS`), and every parameter of
    # a mapping module trains in the optimizer's mapping group (no weight decay).
    learned_names: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, attention_cfg: Any, num_heads: int | None) -> AttentionMapping:
        """The kind built from the attention config (`attention.*`); a kind with parameters reads
        them here. num_heads: the attention module's heads, for per-head parameters."""
        return cls()

    def forward(self, scores: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                key_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """scores [batch, heads, queries, keys]; key_padding_mask [batch, keys], True = padded;
        key_grid (H, W) with H * W = keys when the keys are a feature map (row-major)."""
        if self.needs_grid and key_grid is None:
            raise ValueError(f"the {self.name} mapping needs the key grid: use it only where the keys are the feature map")
        x = scores.float() if scores.dtype in _HALF else scores
        if not torch.is_autocast_enabled(x.device.type):  # entering autocast costs as much as a small call
            return self._masked_map(x, key_padding_mask, key_grid).to(scores.dtype)
        with torch.autocast(x.device.type, enabled=False):  # float32 stays float32 inside
            return self._masked_map(x, key_padding_mask, key_grid).to(scores.dtype)

    def _masked_map(self, x, key_padding_mask, key_grid):
        if key_padding_mask is None:
            return self._call_map(x, key_grid)
        dropped, empty = keys_to_drop(key_padding_mask)
        p = self._call_map(x.masked_fill(dropped, float("-inf")), key_grid)
        return p.masked_fill(empty, 0.0)

    def learned_values(self) -> dict[str, torch.Tensor]:
        """{name in `learned_names`: its current value per head [num_heads]} for what this instance
        learns (empty when its parameters are fixed); what the training loop logs."""
        return {}

    def _call_map(self, x, key_grid):
        return self._map(x, key_grid) if self.needs_grid else self._map(x)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_mapping
class Softmax(AttentionMapping):
    """torch.softmax; no parameters or buffers, so DETR checkpoints load key for key."""
    name = "softmax"

    def _map(self, x):
        return torch.softmax(x, dim=-1)
