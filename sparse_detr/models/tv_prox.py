"""The 2-D total-variation proximal operator on each row's own grid, with a certificate.

For scores z over an H x W grid (a row [H * W], row-major as DETR flattens a feature map) and
lambda >= 0:

    prox(z) = argmin_x 1/2 ||x - z||^2 + lambda * sum over 4-neighbour pairs (i, j) of |x_i - x_j|

Only pairs of two valid cells count: a cell is valid when its score is finite (padded keys come
in as -inf), so the penalty never couples a real cell to a padded one, and with padding at the
bottom and right (as images are batched) each image is solved on its own unpadded grid.

Algorithm (all rows at once, elementwise tensor ops only):
- Accelerated projected gradient (FISTA with adaptive restart, step 1/8 since ||D||^2 <= 8 on a
  grid graph) on the dual min_{|u_e| <= lambda} 1/2 ||z - D^T u||^2, where D takes the
  differences along the edges. The primal iterate is x = z - D^T u.
- Certificate: the duality gap of (x, u), sum_e lambda |(Dx)_e| - (Dx)_e u_e >= 1/2 ||x - x*||^2,
  is checked every CHECK_EVERY iterations; a row is done when its gap is at most the dtype's
  tolerance times the row's cell count, or the rounding floor of the gap itself (a few eps x
  lambda x edges x max |z|), whichever is larger, and the loop goes on with the rows not done.
  Reaching MAX_ITERATIONS first logs a warning with the worst gap: the result is then an
  approximation, and says so.
- Every POLISH_EVERY passes a second candidate: the closed form below on the groups of the edges
  whose dual is strictly inside its box. Its gap with the same dual, 1/2 ||x - w||^2 plus the
  edge terms (w = z - D^T u), is second order in the dual's error, so it certifies sooner.
- Polish: neighbours closer than the certificate allows are grouped (4-connected components,
  `components`); on the right groups the exact solution has the closed form
      x_G = (sum_{i in G} z_i - lambda sum_{i in G} c_i) / |G|,
  c_i = sum of sign(x_i - x_j) over i's neighbours j outside G. A row keeps the polished x when
  its objective is no larger (so the gap bound still holds), which gives exactly equal values
  within each group, as the backward pass assumes.
Backward (exact on the groups): dz = the incoming gradient averaged over each group, and
d lambda = -sum_i c_i dz_i.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.autograd.function import once_differentiable

from sparse_detr.metrics.regions import FOUR_NEIGHBOURS_PER_MAP
from sparse_detr.models.compiled_kernel import run_kernel

log = logging.getLogger(__name__)

LIPSCHITZ = 8.0        # ||D||^2 of a 2-D grid graph is below 8
CHECK_EVERY = 10
POLISH_EVERY = 20   # iterations between tries of `_solution_on_dual_groups`
INSIDE_THE_BOX = 1 - 1e-6
MAX_ITERATIONS = 5000
# Duality gap allowed per valid cell: ||x - x*||_2 <= sqrt(2 * tolerance * cells) before polishing.
_NO_LABEL = 2**62
GAP_TOLERANCE = {torch.float64: 1e-15, torch.float32: 1e-8}


# Layout: a row's grid is flat [n = H * W], row-major; the edge (i, i + 1) is stored at i (weight 0
# where i ends a grid row) and the edge (i, i + W) at i (weight 0 on the last grid row). Shifts of a
# flat row compile to simpler loops than 2-D slices: half the time per dual pass.

def _diff(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D x for x [rows, n] -> (horizontal, vertical) differences [rows, n], x_j - x_i on edge (i, j)."""
    return F.pad(x[:, 1:] - x[:, :-1], (0, 1)), F.pad(x[:, width:] - x[:, :-width], (0, width))


def _diff_adjoint(uh: torch.Tensor, uv: torch.Tensor, width: int) -> torch.Tensor:
    """D^T u -> [rows, n]."""
    return F.pad(uh[:, :-1], (1, 0)) - uh + F.pad(uv[:, :-width], (width, 0)) - uv


def _grid_edges(flat: torch.Tensor, height: int, width: int, vertical: bool) -> torch.Tensor:
    """The [rows, H, W-1] (horizontal) or [rows, H-1, W] (vertical) view of flat edge values."""
    grid = flat.view(-1, height, width)
    return grid[:, :-1, :] if vertical else grid[:, :, :-1]


def _gap(x, lh, lv, uh, uv, width: int, w=None) -> torch.Tensor:
    """Duality gap P(x) - D(u) per row [rows], with w = z - D^T u (default x = w):
    1/2 ||x - w||^2 + sum_e lambda |(Dx)_e| - (Dx)_e u_e, a sum of terms >= 0 (no cancellation)."""
    dh, dv = _diff(x, width)
    gap = (lh * dh.abs() - dh * uh + lv * dv.abs() - dv * uv).sum(1)
    return gap if w is None else gap + 0.5 * ((x - w) ** 2).sum(1)


def _objective(x, z, lh, lv, width: int) -> torch.Tensor:
    dh, dv = _diff(x, width)
    return (0.5 * (x - z) ** 2 + lh * dh.abs() + lv * dv.abs()).sum(1)


def _fista_block(z, lh, lv, uh, uv, vh, vv, t, width: int):
    """CHECK_EVERY accelerated projected gradient steps on the dual; -> the new (uh, uv, vh, vv, t)."""
    for _ in range(CHECK_EVERY):
        dh, dv = _diff(z - _diff_adjoint(vh, vv, width), width)
        nh = torch.minimum(torch.maximum(vh + dh / LIPSCHITZ, -lh), lh)
        nv = torch.minimum(torch.maximum(vv + dv / LIPSCHITZ, -lv), lv)
        # restart the momentum of rows whose step goes against it (O'Donoghue & Candes 2015)
        against = ((vh - nh) * (nh - uh) + (vv - nv) * (nv - uv)).sum(1, keepdim=True)
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        beta = torch.where(against > 0, torch.zeros_like(t), (t - 1) / t_next)
        t = torch.where(against > 0, torch.ones_like(t), t_next)
        vh, vv = nh + beta * (nh - uh), nv + beta * (nv - uv)
        uh, uv = nh, nv
    return uh, uv, vh, vv, t


def _solution_on_dual_groups(z, w, lam, lh, lv, uh, uv, height: int, width: int, compiled: bool):
    """The exact prox if the groups are the components of the edges whose dual is strictly inside
    its box (complementary slackness: |u_e| < lambda forces x_i = x_j), with its duality gap.
    Near the end this certifies in about half the passes x = z - D^T u needs."""
    inside_h = (uh.abs() < lh * INSIDE_THE_BOX) & (lh > 0)
    inside_v = (uv.abs() < lv * INSIDE_THE_BOX) & (lv > 0)
    labels = components(_grid_edges(inside_h, height, width, False), _grid_edges(inside_v, height, width, True), compiled)
    x = _group_mean(z - _diff_adjoint(torch.sign(uh), torch.sign(uv), width) * lam, labels)
    return x, _gap(x, lh, lv, uh, uv, width, w)


def _dual_solve(z, lam, lh, lv, tolerance, height: int, width: int, compiled: bool):
    """FISTA with restart on the dual, blocks of CHECK_EVERY steps compiled like the sparse
    solvers (`compiled_kernel.run_kernel`); -> (x, gap [rows], iterations of the slowest row).

    A row leaves the loop at the first check its certificate passes (the rows of one call need
    from a third to all of the slowest row's passes)."""
    rows = z.shape[0]
    x, gap = torch.empty_like(z), torch.empty(rows, dtype=z.dtype, device=z.device)
    active = torch.arange(rows, device=z.device)
    zeros = torch.zeros_like(z)
    state = (zeros, zeros.clone(), zeros.clone(), zeros.clone(), torch.ones(rows, 1, dtype=z.dtype, device=z.device))
    iterations = 0
    while True:
        state = run_kernel(_fista_block, z, lh, lv, *state, width, compiled=compiled)
        iterations += CHECK_EVERY
        x_active = z - _diff_adjoint(state[0], state[1], width)
        gap_active = _gap(x_active, lh, lv, state[0], state[1], width)
        if iterations % POLISH_EVERY == 0:
            polished, polished_gap = _solution_on_dual_groups(z, x_active, lam, lh, lv, state[0], state[1],
                                                              height, width, compiled)
            use = (polished_gap < gap_active).view(-1, 1)
            x_active, gap_active = torch.where(use, polished, x_active), torch.minimum(polished_gap, gap_active)
        done = gap_active <= tolerance
        n_done = int(done.sum())
        if n_done == len(active) or iterations >= MAX_ITERATIONS:
            x[active], gap[active] = x_active, gap_active
            return x, gap, iterations
        # (set rows aside once there are enough to pay for the copy, and never down to one row:
        # the compiled kernel would specialise on it)
        if n_done * 8 >= len(active) and len(active) - n_done >= 2:
            x[active[done]], gap[active[done]] = x_active[done], gap_active[done]
            keep = ~done
            active, z, lam, lh, lv, tolerance = active[keep], z[keep], lam[keep], lh[keep], lv[keep], tolerance[keep]
            state = tuple(part[keep] for part in state)


def _propagate(labels: torch.Tensor, connect_h: torch.Tensor, connect_v: torch.Tensor) -> torch.Tensor:
    """A few rounds of: each cell takes the smallest label among itself and its connected
    neighbours, then the label of that label (pointer jumping). labels [rows, H, W]."""
    rows, height, width = labels.shape
    big = _NO_LABEL  # a constant, not H * W: a size-dependent fill would make the kernel recompile
    for _ in range(4):
        right = F.pad(torch.where(connect_h, labels[:, :, 1:], big), (0, 1), value=big)
        left = F.pad(torch.where(connect_h, labels[:, :, :-1], big), (1, 0), value=big)
        down = F.pad(torch.where(connect_v, labels[:, 1:, :], big), (0, 0, 0, 1), value=big)
        up = F.pad(torch.where(connect_v, labels[:, :-1, :], big), (0, 0, 1, 0), value=big)
        labels = torch.minimum(torch.minimum(torch.minimum(labels, right), torch.minimum(left, down)), up)
        flat = labels.reshape(rows, height * width)
        labels = flat.gather(1, flat).reshape(rows, height, width)
    return labels


def _components_by_propagation(connect_h: torch.Tensor, connect_v: torch.Tensor, compiled: bool) -> torch.Tensor:
    """`components` in tensor ops (any device): label propagation until nothing changes."""
    rows, height, width = connect_v.shape[0], connect_v.shape[1] + 1, connect_v.shape[2]
    labels = torch.arange(height * width, device=connect_h.device).repeat(rows, 1).reshape(rows, height, width)
    while True:
        new = run_kernel(_propagate, labels, connect_h, connect_v, compiled=compiled)
        if torch.equal(new, labels):
            offsets = torch.arange(rows, device=labels.device).view(rows, 1) * (height * width)
            return new.reshape(rows, height * width) + offsets
        labels = new


def _components_by_scipy(connect_h: torch.Tensor, connect_v: torch.Tensor) -> torch.Tensor:
    """`components` on the CPU with `scipy.ndimage.label` (4-connected within each row's map, as
    `metrics.regions` labels supports), about 15x faster than propagation there: cells sit at the
    even positions of a (2H - 1) x (2W - 1) image per row, and the position between two of them is
    set when an edge connects them."""
    rows, height, width = connect_v.shape[0], connect_v.shape[1] + 1, connect_v.shape[2]
    image = np.zeros((rows, 2 * height - 1, 2 * width - 1), dtype=bool)
    image[:, ::2, ::2] = True
    image[:, ::2, 1::2] = connect_h.numpy()
    image[:, 1::2, ::2] = connect_v.numpy()
    labels, _ = ndimage.label(image, structure=FOUR_NEIGHBOURS_PER_MAP)
    return torch.from_numpy(labels[:, ::2, ::2].reshape(rows, height * width)).long() - 1


def components(connect_h: torch.Tensor, connect_v: torch.Tensor, compiled: bool) -> torch.Tensor:
    """Labels [rows, H * W] of the 4-connected components of each row's grid graph whose edges are
    the True entries of connect_h [rows, H, W-1] and connect_v [rows, H-1, W]: cells share a label
    exactly when they are connected, and labels are distinct across rows, in [0, rows * H * W)."""
    if connect_h.device.type == "cpu":
        return _components_by_scipy(connect_h, connect_v)
    return _components_by_propagation(connect_h, connect_v, compiled)


def _group_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values [rows, n] averaged over each group of `components` labels, written back to every member."""
    flat, index = values.reshape(-1), labels.reshape(-1)
    sums = torch.zeros_like(flat).scatter_add_(0, index, flat)
    counts = torch.zeros_like(flat).scatter_add_(0, index, torch.ones_like(flat))
    return (sums / counts.clamp(min=1)).gather(0, index).view_as(values)


def _boundary_signs(x, lh, lv, labels, width: int) -> torch.Tensor:
    """c [rows, n]: sum of sign(x_i - x_j) over i's penalised neighbours j in another group."""
    dh, dv = _diff(x, width)
    cut_h = (lh > 0) & F.pad(labels[:, 1:] != labels[:, :-1], (0, 1))
    cut_v = (lv > 0) & F.pad(labels[:, width:] != labels[:, :-width], (0, width))
    sh = torch.where(cut_h, torch.sign(dh), torch.zeros_like(dh))  # sign(x_right - x_left)
    sv = torch.where(cut_v, torch.sign(dv), torch.zeros_like(dv))
    return _diff_adjoint(sh, sv, width)  # c_i = sum_j sign(x_i - x_j) = (D^T s)_i


def _edge_weights(lam: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda on each edge of two valid cells, 0 elsewhere, in the flat layout: (lh, lv) [rows, n]."""
    both_h = F.pad(valid[:, :, 1:] & valid[:, :, :-1], (0, 1))
    both_v = F.pad(valid[:, 1:, :] & valid[:, :-1, :], (0, 0, 0, 1))
    rows = valid.shape[0]
    return lam.view(rows, 1) * both_h.reshape(rows, -1), lam.view(rows, 1) * both_v.reshape(rows, -1)


def tv_prox_grid(z: torch.Tensor, lam: torch.Tensor, valid: torch.Tensor, compiled: bool = False):
    """z [rows, H, W] (finite), lam [rows, 1, 1] >= 0, valid [rows, H, W] -> (x [rows, H, W],
    `components` labels [rows, H * W], c [rows, H * W]); see the module docstring.
    compiled: the dual steps through torch.compile."""
    rows, height, width = z.shape
    lh, lv = _edge_weights(lam.to(z.dtype), valid)
    lam, z = lam.view(rows, 1), z.reshape(rows, height * width)
    cells = valid.flatten(1).sum(1).to(z.dtype)
    penalty = (lh + lv).sum(1)  # lambda x number of penalised edges
    rounding = 4 * torch.finfo(z.dtype).eps * penalty * z.abs().amax(1)
    tolerance = torch.maximum(GAP_TOLERANCE.get(z.dtype, GAP_TOLERANCE[torch.float32]) * cells.clamp(min=1), rounding)
    x, gap, iterations = _dual_solve(z, lam, lh, lv, tolerance, height, width, compiled)
    if not bool((gap <= tolerance).all()):
        worst = int((gap / tolerance).argmax())
        log.warning("TVMax: the TV prox stopped at its cap of %d iterations with %d of %d rows uncertified "
                    "(worst duality gap %.3g > %.3g); those rows are approximate",
                    iterations, int((gap > tolerance).sum()), rows, float(gap[worst]), float(tolerance[worst]))
    # group neighbours that the certificate cannot tell apart, then solve exactly on the groups
    reach = 2 * torch.sqrt(2 * gap.clamp(min=0)).view(-1, 1) + 4 * torch.finfo(z.dtype).eps * z.abs().amax(1, keepdim=True)
    dh, dv = _diff(x, width)
    labels = components(_grid_edges((lh > 0) & (dh.abs() <= reach), height, width, False),
                        _grid_edges((lv > 0) & (dv.abs() <= reach), height, width, True), compiled)
    c = _boundary_signs(x, lh, lv, labels, width)
    polished = _group_mean(z - lam * c, labels)
    objective, polished_objective = _objective(x, z, lh, lv, width), _objective(polished, z, lh, lv, width)
    slack = 8 * torch.finfo(z.dtype).eps * objective.abs().clamp(min=1)
    better = (polished_objective <= objective + slack).view(-1, 1)
    x = torch.where(better, polished, x)
    return x.view(rows, height, width), labels, c


class TVProxFunction(torch.autograd.Function):
    """z [rows, H, W], lam [rows, 1, 1], valid [rows, H, W] -> prox [rows, H, W]; gradients for z and lam."""

    @staticmethod
    def forward(ctx, z, lam, valid, compiled: bool):
        x, labels, c = tv_prox_grid(z.detach(), lam.detach(), valid, compiled)
        ctx.save_for_backward(labels, c)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        labels, c = ctx.saved_tensors
        dz = _group_mean(g.reshape(labels.shape), labels)
        dlam = -(c * dz).sum(1).view(-1, 1, 1) if ctx.needs_input_grad[1] else None
        return dz.view_as(g), dlam, None, None
