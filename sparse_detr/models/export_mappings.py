"""Export-friendly formulations of the sparse mappings, and swapping them into a built model.

The training mappings find the threshold with a compiled Newton solver whose rows that fail to
converge are recomputed by another algorithm: data-dependent control flow that ONNX and
TorchScript cannot hold. The same mappings are computed here without it:

- sparsemax and 1.5-entmax: the exact sort-based thresholds (Martins & Astudillo 2016; Peters et
  al. 2019): sort, cumulative sums, the support size, the threshold, all in closed form;
- alpha-entmax (fixed or learned alpha per head): a fixed number of bisection halvings on the
  threshold (as the entmax package's `entmax_bisect`), which leave it just below the root, then
  Newton steps, which from below converge monotonically and quadratically (the sum of the
  weights is convex and decreasing in the threshold), then normalisation. Every step is unrolled:
  `BISECTION_STEPS + NEWTON_STEPS` is what the exported graph holds per attention module.

Masking is the training mappings' own (`AttentionMapping.forward`): padded keys get exactly 0.
The tests check these against the training mappings within 1e-6, and exported models against
PyTorch's outputs.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_detr.models.mappings import AttentionMapping
from sparse_detr.models.mappings.entmax import AlphaEntmax, Entmax15, Sparsemax

BISECTION_STEPS = 12  # the bracket shrinks to 2^-12 of its width (at most 1)
NEWTON_STEPS = 3


def finite(x: torch.Tensor, drop: float) -> torch.Tensor:
    """-inf (padded keys) -> a finite value `drop` below the row maximum, which the mapping maps to 0.

    Sort-based sums must not meet inf - inf; `drop` exceeds the widest gap between the largest
    score and the threshold (1 for sparsemax on the scores, 1 for 1.5-entmax on the halved scores)."""
    return torch.where(torch.isinf(x), x.amax(-1, keepdim=True) - drop, x)


def ranks(sorted_x: torch.Tensor) -> torch.Tensor:
    """1, 2, ..., n along the last dim, of a dynamic n (an arange whose length ONNX reads from the input)."""
    return torch.ones_like(sorted_x).cumsum(-1)


class SortedSparsemax(AttentionMapping):
    def _map(self, x):
        z = finite(x, 2.0)
        z = z - z.amax(-1, keepdim=True)
        zs = z.sort(-1, descending=True).values
        k = ranks(zs)
        cumulative = zs.cumsum(-1)
        support = (1 + k * zs > cumulative).sum(-1, keepdim=True)
        tau = (cumulative.gather(-1, support - 1) - 1) / support.to(z.dtype)
        return (z - tau).clamp(min=0)


class SortedEntmax15(AttentionMapping):
    def _map(self, x):
        z = finite(x / 2, 2.0)
        z = z - z.amax(-1, keepdim=True)
        zs = z.sort(-1, descending=True).values
        k = ranks(zs)
        mean = zs.cumsum(-1) / k
        mean_sq = (zs * zs).cumsum(-1) / k
        delta = ((1 - k * (mean_sq - mean * mean)) / k).clamp(min=0)
        tau = mean - delta.sqrt()
        support = (tau <= zs).sum(-1, keepdim=True)
        return (z - tau.gather(-1, support - 1)).clamp(min=0) ** 2


class BisectedAlphaEntmax(AlphaEntmax):
    """alpha-entmax by bisection: the training module's alpha (fixed or learned, same parameter
    names) with an export-friendly solver."""

    @classmethod
    def like(cls, source: AlphaEntmax) -> "BisectedAlphaEntmax":
        if source.learn_alpha:
            mapping = cls(learn_alpha=True, num_heads=len(source.pre_alpha), impl="eager")
            mapping.load_state_dict(source.state_dict())
            return mapping.to(source.pre_alpha.device)
        return cls(source.fixed_alpha, impl="eager")

    def _map(self, x):
        alpha = self.alpha.to(x.dtype)
        alpha = alpha.view(1, -1, 1, 1) if self.learn_alpha else alpha
        z = finite(x, 1.0 / (alpha.min() - 1) + 2.0) * (alpha - 1)
        low = z.amax(-1, keepdim=True) - 1.0                         # p of the top key <= 1
        width = 1.0 - (1.0 / ranks(z)[..., -1:]) ** (alpha - 1)     # p of the top key >= 1 / n
        power = 1 / (alpha - 1)
        for _ in range(BISECTION_STEPS):
            width = width / 2
            middle = low + width
            total = ((z - middle).clamp(min=0) ** power).sum(-1, keepdim=True)
            low = torch.where(total >= 1, middle, low)
        for _ in range(NEWTON_STEPS):  # f(tau) = sum p - 1 >= 0 here; tau += f / -f'
            gap = (z - low).clamp(min=0)
            slope = (power * torch.where(gap > 0, gap ** (power - 1), torch.zeros_like(gap))).sum(-1, keepdim=True)
            low = low + ((gap ** power).sum(-1, keepdim=True) - 1) / slope
        p = (z - low).clamp(min=0) ** power
        return p / p.sum(-1, keepdim=True)


def export_mapping(mapping: nn.Module) -> nn.Module:
    """The export-friendly equivalent of a training mapping (softmax is already one)."""
    if isinstance(mapping, Sparsemax):
        return SortedSparsemax()
    if isinstance(mapping, Entmax15):
        return SortedEntmax15()
    if isinstance(mapping, AlphaEntmax):
        return BisectedAlphaEntmax.like(mapping)
    return mapping


def use_export_mappings(model: nn.Module) -> nn.Module:
    """Swap every attention module's mapping for its export-friendly equivalent, in place."""
    for module in model.modules():
        if hasattr(module, "mapping") and isinstance(module.mapping, AttentionMapping):
            module.mapping = export_mapping(module.mapping)
    return model
