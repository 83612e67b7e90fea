"""Attention mappings: scores [batch, heads, queries, keys] -> probabilities over keys.

`attention_mapping(name, ...)` builds one of MAPPINGS as a small nn.Module with the same call
signature for all: `m(scores, key_padding_mask=None)`. Every mapping
- computes in float32 when the scores are float16/bfloat16 (the sort- and threshold-based
  mappings drift by 1e-2 in half precision) and returns the scores' dtype;
- treats key padding as truncation: padded keys get exactly 0 and the others get what the
  mapping gives on the unpadded keys alone; a row whose keys are all padded returns zeros, with a
  zero gradient (never NaN).
impl: "fast" = Newton solver of `sparse_solver` through torch.compile (eager if compilation is
unavailable), "eager" = the same solver without compiling, "reference" = the entmax package
(sort-based sparsemax/entmax15, bisection for alpha-entmax), kept for tests and benchmarks.
"""

from __future__ import annotations

import math
from typing import Callable

import entmax
import torch
from torch import nn

from sparse_detr.config import ALPHA_FLOOR
from sparse_detr.config import MAPPING_IMPLS as IMPLS
from sparse_detr.config import MAPPING_NAMES as MAPPINGS
from sparse_detr.models.sparse_solver import entmax_rows
_HALF = (torch.float16, torch.bfloat16)


def attention_mapping(
    name: str,
    *,
    num_heads: int | None = None,
    alpha: float = 1.5,
    learn_alpha: bool = False,
    impl: str = "fast",
) -> nn.Module:
    """Build the mapping `name` (one of MAPPINGS) with solver `impl` (one of IMPLS).

    alpha / learn_alpha / num_heads only matter for "alpha_entmax"; a learned alpha is one value
    per head and needs num_heads."""
    if name not in MAPPINGS:
        raise ValueError(f"unknown attention mapping {name!r}; valid: {', '.join(MAPPINGS)}")
    if impl not in IMPLS:
        raise ValueError(f"unknown mapping impl {impl!r}; valid: {', '.join(IMPLS)}")
    if name == "softmax":
        return Softmax()
    if name == "sparsemax":
        return Sparsemax(impl)
    if name == "entmax15":
        return Entmax15(impl)
    return AlphaEntmax(alpha, learn_alpha=learn_alpha, num_heads=num_heads, impl=impl)


class AttentionMapping(nn.Module):
    """Shared masking and dtype handling; subclasses define `_map(x)` over the last dim.

    `_map` receives padded keys as -inf (only in rows that keep at least one key) and must give
    them 0; fully padded rows are computed as if unpadded and zeroed afterwards, so neither the
    output nor the gradient of such a row can be NaN."""

    def forward(self, scores: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """scores [batch, heads, queries, keys]; key_padding_mask [batch, keys], True = padded."""
        x = scores.float() if scores.dtype in _HALF else scores
        with torch.autocast(x.device.type, enabled=False):  # float32 stays float32 inside
            if key_padding_mask is None:
                return self._map(x).to(scores.dtype)
            padded = key_padding_mask[:, None, None, :]
            empty = padded.all(-1, keepdim=True)
            p = self._map(x.masked_fill(padded & ~empty, float("-inf")))
            return p.masked_fill(empty, 0.0).to(scores.dtype)

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Softmax(AttentionMapping):
    """torch.softmax; no parameters or buffers, so DETR checkpoints load key for key."""

    def _map(self, x):
        return torch.softmax(x, dim=-1)


def _finite_fill(x: torch.Tensor, alpha) -> torch.Tensor:
    """Replace -inf by a finite value that alpha-entmax surely maps to 0 (max - 1/(alpha-1) - 1).

    The entmax package fails on -inf (index error in sort-based, NaN in bisection)."""
    m = x.amax(-1, keepdim=True)
    return torch.where(x == float("-inf"), m - 1 / (alpha - 1) - 1, x)


class FixedEntmax(AttentionMapping):
    """alpha-entmax at a fixed alpha with a closed-form threshold; subclasses name the alpha."""
    solver: str                       # the fast solver's name for this alpha
    alpha: float
    reference: Callable               # the entmax package's function

    def __init__(self, impl: str = "fast"):
        super().__init__()
        self.impl = impl

    def _map(self, x):
        if self.impl == "reference":
            return self.reference(_finite_fill(x, self.alpha), dim=-1)
        return entmax_rows(x, self.solver, compiled=self.impl == "fast")

    def extra_repr(self):
        return f"impl={self.impl}"


class Sparsemax(FixedEntmax):
    """sparsemax (Martins & Astudillo 2016): Euclidean projection of the scores onto the simplex."""
    solver, alpha, reference = "sparsemax", 2.0, staticmethod(entmax.sparsemax)


class Entmax15(FixedEntmax):
    """1.5-entmax (Peters et al. 2019): sparse like sparsemax, smoother near ties."""
    solver, alpha, reference = "entmax15", 1.5, staticmethod(entmax.entmax15)


class AlphaEntmax(AttentionMapping):
    """alpha-entmax (Correia et al. 2019), alpha in (1, 2]; fixed, or learned per head.

    Learned: alpha = ALPHA_FLOOR + (2 - ALPHA_FLOOR) * sigmoid(pre_alpha), pre_alpha [num_heads],
    so alpha stays strictly above 1 (where entmax degenerates) whatever the optimiser does."""

    def __init__(self, alpha: float = 1.5, *, learn_alpha: bool = False, num_heads: int | None = None, impl: str = "fast"):
        super().__init__()
        alpha = float(alpha)
        if not 1.0 < alpha <= 2.0:
            raise ValueError(f"alpha must be in (1, 2], got {alpha}")
        self.impl = impl
        self.learn_alpha = learn_alpha
        if learn_alpha:
            if num_heads is None:
                raise ValueError("learn_alpha=True needs num_heads (one alpha per head)")
            if not ALPHA_FLOOR < alpha < 2.0:
                raise ValueError(
                    f"a learned alpha must start in ({ALPHA_FLOOR}, 2) (sigmoid parametrisation), got {alpha}"
                )
            s = (alpha - ALPHA_FLOOR) / (2.0 - ALPHA_FLOOR)
            self.pre_alpha = nn.Parameter(torch.full((num_heads,), math.log(s / (1 - s))))
        else:
            self.fixed_alpha = alpha

    @property
    def alpha(self) -> torch.Tensor:
        """Current alpha: [num_heads] if learned (differentiable), else a scalar tensor."""
        if self.learn_alpha:
            return ALPHA_FLOOR + (2.0 - ALPHA_FLOOR) * torch.sigmoid(self.pre_alpha)
        return torch.tensor(self.fixed_alpha)

    def _map(self, x):
        # per-head alpha broadcasts over [batch, heads, queries, 1]; a fixed one stays a float
        alpha = self.alpha.to(x.dtype).view(1, -1, 1, 1) if self.learn_alpha else self.fixed_alpha
        if self.impl == "reference":
            n_iter = 100 if x.dtype == torch.float64 else 30
            return entmax.entmax_bisect(_finite_fill(x, alpha), alpha, dim=-1, n_iter=n_iter)
        return entmax_rows(x, "alpha_entmax", alpha, compiled=self.impl == "fast")

    def extra_repr(self):
        return f"learn_alpha={self.learn_alpha}, impl={self.impl}"
