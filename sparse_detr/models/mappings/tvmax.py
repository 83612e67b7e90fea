"""TVMax (Martins et al., "Sparse and Structured Visual Attention", ICIP 2021): sparse and
spatially contiguous attention over the image grid.

For one query's scores z over its image's own H x W feature map,

    TVmax(z) = argmin over p in the simplex of 1/2 ||p - z||^2 + lambda * sum_(i,j) |p_i - p_j|,

the sum over 4-neighbour pairs, computed as sparsemax of the 2-D TV prox of z (`tv_prox`), on
the cells that can be nonzero (`tvmax_cells`).
Only sites whose keys are the feature map can use it (encoder self- and decoder
cross-attention): the mapping needs the key grid (H, W) of the padded map, and padded keys
(-inf after masking) are neither in the simplex nor coupled by the penalty. impl "fast" compiles
the prox's dual steps and the sparsemax with torch.compile; "eager" runs the same eagerly;
"reference" solves eagerly on the whole grid (there is no TVMax in the entmax package).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sparse_detr.models.mappings.base import AttentionMapping, config_value, register_mapping
from sparse_detr.models.tvmax_cells import tvmax_on_grid, tvmax_rows


@register_mapping
class TVMax(AttentionMapping):
    """TVMax with lambda > 0 fixed, or learned per head (lambda = exp(log_lambda), [num_heads])."""
    name = "tvmax"
    needs_grid = True
    learned_names = ("lambda",)

    def __init__(self, tv_lambda: float = 0.1, *, learn_lambda: bool = False, num_heads: int | None = None,
                 impl: str = "fast"):
        super().__init__()
        tv_lambda = float(tv_lambda)
        if not tv_lambda >= 0.0 or (learn_lambda and tv_lambda == 0.0):
            raise ValueError(f"tv_lambda must be > 0 (>= 0 when fixed), got {tv_lambda}")
        self.impl = impl
        self.learn_lambda = learn_lambda
        if learn_lambda:
            if num_heads is None:
                raise ValueError("learn_lambda=True needs num_heads (one lambda per head)")
            self.log_lambda = nn.Parameter(torch.full((num_heads,), math.log(tv_lambda)))
        else:
            self.fixed_lambda = tv_lambda

    @classmethod
    def from_config(cls, attention_cfg, num_heads):
        return cls(config_value(attention_cfg, "tv_lambda", 0.1),
                   learn_lambda=config_value(attention_cfg, "learn_lambda", False),
                   num_heads=num_heads, impl=config_value(attention_cfg, "impl", "fast"))

    @property
    def tv_lambda(self) -> torch.Tensor:
        """Current lambda: [num_heads] if learned (differentiable), else a scalar tensor."""
        return self.log_lambda.exp() if self.learn_lambda else torch.tensor(self.fixed_lambda)

    def learned_values(self):
        return {"lambda": self.tv_lambda} if self.learn_lambda else {}

    def _map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        batch, heads, queries, keys = x.shape
        height, width = grid
        if height * width != keys:
            raise ValueError(f"TVMax: key grid {height} x {width} does not match {keys} keys")
        lam = self.tv_lambda.to(x).view(1, -1, 1, 1) if self.learn_lambda else torch.tensor(self.fixed_lambda).to(x)
        lam = lam.expand(batch, heads, queries, 1).reshape(-1, 1)
        if self.impl == "reference":
            return tvmax_on_grid(x.reshape(-1, keys), lam, width, compiled=False).view_as(x)
        return tvmax_rows(x.reshape(-1, keys), lam, width, self.impl == "fast", images=batch).view_as(x)

    def extra_repr(self):
        return f"learn_lambda={self.learn_lambda}, impl={self.impl}"
