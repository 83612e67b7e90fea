"""sparsemax, entmax-1.5 and alpha-entmax (fixed, or learned per head).

impl, resolved once when the mapping is built: "fast" = the threshold solver of `sparse_solver`
through torch.compile (eager if compilation is unavailable), "eager" = the same solver without
compiling, "reference" = the entmax package (sort-based sparsemax/entmax15, bisection for
alpha-entmax), kept for tests and benchmarks.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import entmax
import torch
from torch import nn

from sparse_detr.config import ALPHA_INITS, ALPHA_PARAMS
from sparse_detr.models.mappings.base import ALPHA_FLOOR, AttentionMapping, config_value, register_mapping
from sparse_detr.models.sparse_solver import ALPHA_ENTMAX, ENTMAX15, SPARSEMAX, ThresholdSolver


def _finite_fill(x: torch.Tensor, alpha) -> torch.Tensor:
    """Replace -inf by a finite value that alpha-entmax surely maps to 0 (max - 1/(alpha-1) - 1).

    The entmax package fails on -inf (index error in sort-based, NaN in bisection)."""
    m = x.amax(-1, keepdim=True)
    return torch.where(x == float("-inf"), m - 1 / (alpha - 1) - 1, x)


def _fixed_reference(function: Callable, alpha: float, x: torch.Tensor, _alpha) -> torch.Tensor:
    """The entmax package's sparsemax or entmax15 of x, -inf made finite first."""
    return function(_finite_fill(x, alpha), dim=-1)


def _rows_function(solver: ThresholdSolver, impl: str, reference: Callable) -> Callable:
    """(x, alpha) -> p for `impl`: the entmax package, or the solver compiled or eager."""
    if impl == "reference":
        return reference
    return functools.partial(solver.rows, compiled=impl == "fast")


class FixedEntmax(AttentionMapping):
    """alpha-entmax at a fixed alpha with a closed-form threshold; subclasses name the alpha."""
    solver: ThresholdSolver
    alpha: float
    reference: Callable               # the entmax package's function

    def __init__(self, impl: str = "fast"):
        super().__init__()
        self.impl = impl
        self._rows = _rows_function(self.solver, impl, functools.partial(_fixed_reference, self.reference, self.alpha))

    @classmethod
    def from_config(cls, attention_cfg, num_heads):
        return cls(config_value(attention_cfg, "impl", "fast"))

    def _map(self, x):
        return self._rows(x, None)

    def extra_repr(self):
        return f"impl={self.impl}"


@register_mapping
class Sparsemax(FixedEntmax):
    """sparsemax (Martins & Astudillo 2016): Euclidean projection of the scores onto the simplex."""
    name, solver, alpha, reference = "sparsemax", SPARSEMAX, 2.0, staticmethod(entmax.sparsemax)


@register_mapping
class Entmax15(FixedEntmax):
    """1.5-entmax (Peters et al. 2019): sparse like sparsemax, smoother near ties."""
    name, solver, alpha, reference = "entmax15", ENTMAX15, 1.5, staticmethod(entmax.entmax15)


def _bisect_reference(x: torch.Tensor, alpha) -> torch.Tensor:
    """The entmax package's bisection (enough iterations for the dtype), -inf made finite first."""
    n_iter = 100 if x.dtype == torch.float64 else 30
    return entmax.entmax_bisect(_finite_fill(x, alpha), alpha, dim=-1, n_iter=n_iter)


def _scaled_sigmoid(pre_alpha: torch.Tensor) -> torch.Tensor:
    """ALPHA_FLOOR + (2 - ALPHA_FLOOR) * sigmoid: every value of pre_alpha is a valid alpha with
    a nonzero gradient."""
    return ALPHA_FLOOR + (2.0 - ALPHA_FLOOR) * torch.sigmoid(pre_alpha)


def _clamped_sigmoid(pre_alpha: torch.Tensor) -> torch.Tensor:
    """The thesis's clamp(1 + sigmoid, ALPHA_FLOOR, 2): below pre_alpha ~ -4.6 alpha sticks at the
    floor with a zero gradient."""
    return torch.clamp(1.0 + torch.sigmoid(pre_alpha), min=ALPHA_FLOOR, max=2.0)


# attention.alpha_param -> (pre_alpha -> alpha, the pre_alpha of a given alpha in (ALPHA_FLOOR, 2))
ALPHA_PARAMETRISATIONS = {
    "scaled_sigmoid": (_scaled_sigmoid, lambda a: math.log((a - ALPHA_FLOOR) / (2.0 - a))),
    "clamped_sigmoid": (_clamped_sigmoid, lambda a: math.log((a - 1.0) / (2.0 - a))),
}


@register_mapping
class AlphaEntmax(AttentionMapping):
    """alpha-entmax (Correia et al. 2019), alpha in (1, 2]; fixed, or learned per head.

    Learned: one pre_alpha per head, alpha = f(pre_alpha) in [ALPHA_FLOOR, 2) whatever the
    optimiser does (entmax degenerates at alpha = 1). f is `alpha_param`: "scaled_sigmoid"
    (ALPHA_FLOOR + (2 - ALPHA_FLOOR) sigmoid) or the thesis's "clamped_sigmoid"
    (clamp(1 + sigmoid, ALPHA_FLOOR, 2)). `alpha_init`: "value" starts every head at `alpha`,
    "random" draws pre_alpha from a standard normal with torch's global generator (the trainer
    seeds it with the run's seed before building the model), as the thesis did."""
    name, solver = "alpha_entmax", ALPHA_ENTMAX
    learned_names = ("alpha",)

    def __init__(self, alpha: float = 1.5, *, learn_alpha: bool = False, num_heads: int | None = None,
                 impl: str = "fast", alpha_init: str = "value", alpha_param: str = "scaled_sigmoid"):
        super().__init__()
        alpha = float(alpha)
        if not 1.0 < alpha <= 2.0:
            raise ValueError(f"alpha must be in (1, 2], got {alpha}")
        if alpha_param not in ALPHA_PARAMS:
            raise ValueError(f"unknown alpha_param {alpha_param!r}; valid: {', '.join(ALPHA_PARAMS)}")
        if alpha_init not in ALPHA_INITS:
            raise ValueError(f"unknown alpha_init {alpha_init!r}; valid: {', '.join(ALPHA_INITS)}")
        self.impl = impl
        self.learn_alpha = learn_alpha
        if learn_alpha:
            if num_heads is None:
                raise ValueError("learn_alpha=True needs num_heads (one alpha per head)")
            self.alpha_param, self.alpha_init = alpha_param, alpha_init
            self._alpha_of, pre_alpha_of = ALPHA_PARAMETRISATIONS[alpha_param]
            if alpha_init == "random":
                self.pre_alpha = nn.Parameter(torch.randn(num_heads))
            else:
                if not ALPHA_FLOOR < alpha < 2.0:
                    raise ValueError(
                        f"a learned alpha must start in ({ALPHA_FLOOR}, 2) (sigmoid parametrisation), got {alpha}"
                    )
                self.pre_alpha = nn.Parameter(torch.full((num_heads,), pre_alpha_of(alpha)))
        else:
            self.fixed_alpha = alpha
        self._rows = _rows_function(self.solver, impl, _bisect_reference)

    @classmethod
    def from_config(cls, attention_cfg, num_heads):
        return cls(config_value(attention_cfg, "alpha", 1.5), learn_alpha=config_value(attention_cfg, "learn_alpha", False),
                   num_heads=num_heads, impl=config_value(attention_cfg, "impl", "fast"),
                   alpha_init=config_value(attention_cfg, "alpha_init", "value"),
                   alpha_param=config_value(attention_cfg, "alpha_param", "scaled_sigmoid"))

    @property
    def alpha(self) -> torch.Tensor:
        """Current alpha: [num_heads] if learned (differentiable), else a scalar tensor."""
        if self.learn_alpha:
            return self._alpha_of(self.pre_alpha)
        return torch.tensor(self.fixed_alpha)

    def learned_values(self):
        return {"alpha": self.alpha} if self.learn_alpha else {}

    def _map(self, x):
        # per-head alpha broadcasts over [batch, heads, queries, 1]; a fixed one stays a float
        return self._rows(x, self.alpha.to(x.dtype).view(1, -1, 1, 1) if self.learn_alpha else self.fixed_alpha)

    def extra_repr(self):
        learned = f", alpha_init={self.alpha_init}, alpha_param={self.alpha_param}" if self.learn_alpha else ""
        return f"learn_alpha={self.learn_alpha}{learned}, impl={self.impl}"
