"""Exact thresholds of alpha-entmax by classic algorithms: the solver's fallback for rows its
Newton passes never certified (rare, so these stay eager and simple).

Rows z [rows, n] are the shifted scores of `sparse_solver._shifted` (max 0, clipped at -2), so
the threshold lies in [-1, 0].
"""

from __future__ import annotations

import torch


def sort_tau(z: torch.Tensor, q: float) -> torch.Tensor:
    """Sort-based exact threshold (Martins & Astudillo 2016; Peters et al. 2019), rows z [rows, n]."""
    zs = z.sort(-1, descending=True).values
    rho = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    mean = zs.cumsum(-1) / rho
    if q == 1.0:
        taus = mean - 1 / rho
    else:
        mean_sq = (zs * zs).cumsum(-1) / rho
        taus = mean - ((1 - rho * (mean_sq - mean * mean)) / rho).clamp(min=0).sqrt()
    support = (taus < zs).sum(-1, keepdim=True).clamp(min=1)
    return taus.gather(-1, support - 1)


def bisect_tau(z: torch.Tensor, q: torch.Tensor, iters: int) -> torch.Tensor:
    """Bisection for tau in [-1, 0] on sum([z - tau]_+^q) = 1, rows z [rows, n]."""
    lo = torch.full_like(z[:, :1], -1.0)
    width = 1.0
    for _ in range(iters):
        width /= 2
        mid = lo + width
        lo = torch.where(((z - mid).clamp(min=0) ** q).sum(-1, keepdim=True) >= 1, mid, lo)
    return lo
