"""The total-variation proximal operator on each row's own grid graph, with a certificate.

For scores z over the cells of a row and lambda >= 0:

    prox(z) = argmin_x 1/2 ||x - z||^2 + lambda * sum over the row's edges (i, j) of |x_i - x_j|

The edges join 4-neighbours, and the caller says which pairs count (`grid_edges` for the grid of
valid cells: the penalty never couples a real cell to a padded one, so with padding at the bottom
and right each image is solved on its own unpadded grid). A row is laid out as a whole H x W grid,
or as packed cells with neighbour tables (`tvmax_cells` packs the cells that can be nonzero).

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
# Duality gap allowed per cell with an edge: ||x - x*||_2 <= sqrt(2 * tolerance * cells) before polishing.
_NO_LABEL = 2**62
GAP_TOLERANCE = {torch.float64: 1e-15, torch.float32: 1e-8}


# Layouts. A row holds its cells flat [n]; the edge from a cell to its right and to its lower
# neighbour is stored at the cell, with weight 0 where there is no such neighbour.
# - grid: `nb` is the width W of a row-major H x W grid, and neighbours are shifts of the flat row
#   (shifts compile to simpler loops than 2-D slices: half the time per dual pass);
# - packed: `nb` = (right, down, left, up), index tensors [rows, n] into the same row (what
#   `tvmax_cells` builds from the cells that can be nonzero); a cell without that neighbour
#   points at a slot without edges, whose duals stay 0.

def _right(x: torch.Tensor, nb) -> torch.Tensor:
    """Each cell's right neighbour's value (arbitrary where there is none)."""
    return x.gather(1, nb[0]) if isinstance(nb, tuple) else F.pad(x[:, 1:], (0, 1))


def _below(x: torch.Tensor, nb) -> torch.Tensor:
    return x.gather(1, nb[1]) if isinstance(nb, tuple) else F.pad(x[:, nb:], (0, nb))


def _left(x: torch.Tensor, nb) -> torch.Tensor:
    """Each cell's left neighbour's value; of an edge value, 0 where there is no left neighbour."""
    return x.gather(1, nb[2]) if isinstance(nb, tuple) else F.pad(x[:, :-1], (1, 0))


def _above(x: torch.Tensor, nb) -> torch.Tensor:
    return x.gather(1, nb[3]) if isinstance(nb, tuple) else F.pad(x[:, :-nb], (nb, 0))


def _diff(x: torch.Tensor, nb) -> tuple[torch.Tensor, torch.Tensor]:
    """D x for x [rows, n] -> (horizontal, vertical) differences [rows, n], x_j - x_i on edge (i, j)
    (0 at the grid's last cell and row: padding the difference compiles to a faster loop)."""
    if isinstance(nb, tuple):
        return _right(x, nb) - x, _below(x, nb) - x
    return F.pad(x[:, 1:] - x[:, :-1], (0, 1)), F.pad(x[:, nb:] - x[:, :-nb], (0, nb))


def _diff_adjoint(uh: torch.Tensor, uv: torch.Tensor, nb) -> torch.Tensor:
    """D^T u -> [rows, n]."""
    return _left(uh, nb) - uh + _above(uv, nb) - uv


def _gap(x, lh, lv, uh, uv, nb, w=None) -> torch.Tensor:
    """Duality gap P(x) - D(u) per row [rows], with w = z - D^T u (default x = w):
    1/2 ||x - w||^2 + sum_e lambda |(Dx)_e| - (Dx)_e u_e, a sum of terms >= 0 (no cancellation)."""
    dh, dv = _diff(x, nb)
    gap = (lh * dh.abs() - dh * uh + lv * dv.abs() - dv * uv).sum(1)
    return gap if w is None else gap + 0.5 * ((x - w) ** 2).sum(1)


def _objective(x, z, lh, lv, nb) -> torch.Tensor:
    dh, dv = _diff(x, nb)
    return (0.5 * (x - z) ** 2 + lh * dh.abs() + lv * dv.abs()).sum(1)


def _fista_block(z, lh, lv, uh, uv, vh, vv, t, nb):
    """CHECK_EVERY accelerated projected gradient steps on the dual; -> the new (uh, uv, vh, vv, t)."""
    for _ in range(CHECK_EVERY):
        dh, dv = _diff(z - _diff_adjoint(vh, vv, nb), nb)
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


def _solution_on_dual_groups(z, w, lam, lh, lv, uh, uv, nb, compiled: bool):
    """The exact prox if the groups are the components of the edges whose dual is strictly inside
    its box (complementary slackness: |u_e| < lambda forces x_i = x_j), with its duality gap.
    Near the end this certifies in about half the passes x = z - D^T u needs."""
    inside_h = (uh.abs() < lh * INSIDE_THE_BOX) & (lh > 0)
    inside_v = (uv.abs() < lv * INSIDE_THE_BOX) & (lv > 0)
    labels = components(inside_h, inside_v, nb, compiled)
    x = _group_mean(z - _diff_adjoint(torch.sign(uh), torch.sign(uv), nb) * lam, labels)
    return x, _gap(x, lh, lv, uh, uv, nb, w)


def _rows_of(nb, keep: torch.Tensor):
    """The layout of the rows `keep` selects."""
    return tuple(index[keep] for index in nb) if isinstance(nb, tuple) else nb


def _dual_solve(z, lam, lh, lv, tolerance, nb, compiled: bool):
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
        state = run_kernel(_fista_block, z, lh, lv, *state, nb, compiled=compiled)
        iterations += CHECK_EVERY
        x_active = z - _diff_adjoint(state[0], state[1], nb)
        gap_active = _gap(x_active, lh, lv, state[0], state[1], nb)
        if iterations % POLISH_EVERY == 0:
            polished, polished_gap = _solution_on_dual_groups(z, x_active, lam, lh, lv, state[0], state[1], nb, compiled)
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
            state, nb = tuple(part[keep] for part in state), _rows_of(nb, keep)


def _propagate(labels: torch.Tensor, connect_h: torch.Tensor, connect_v: torch.Tensor, nb):
    """A few rounds of: each cell takes the smallest label among itself and its connected
    neighbours, then the label of that label (pointer jumping). labels [rows, n] -> (labels,
    settled: the last round changed nothing, so no later round would: they are final)."""
    big = _NO_LABEL  # a constant, not n: a size-dependent fill would make the kernel recompile
    for _ in range(4):
        previous = labels
        right = torch.where(connect_h, _right(labels, nb), big)
        left = torch.where(_left(connect_h, nb), _left(labels, nb), big)
        down = torch.where(connect_v, _below(labels, nb), big)
        up = torch.where(_above(connect_v, nb), _above(labels, nb), big)
        labels = torch.minimum(torch.minimum(torch.minimum(labels, right), torch.minimum(left, down)), up)
        labels = labels.gather(1, labels)
    return labels, (labels == previous).all()


def _components_by_propagation(connect_h: torch.Tensor, connect_v: torch.Tensor, nb, compiled: bool) -> torch.Tensor:
    """`components` in tensor ops (any device): label propagation until nothing changes."""
    rows, n = connect_h.shape
    labels = torch.arange(n, device=connect_h.device).repeat(rows, 1)
    while True:
        labels, settled = run_kernel(_propagate, labels, connect_h, connect_v, nb, compiled=compiled)
        if bool(settled):
            return labels + torch.arange(rows, device=labels.device).view(rows, 1) * n


def _components_of_grid_by_scipy(connect_h: torch.Tensor, connect_v: torch.Tensor, width: int) -> torch.Tensor:
    """`components` of the grid layout on the CPU with `scipy.ndimage.label` (4-connected within
    each row's map, as `metrics.regions` labels supports), about 15x faster than propagation there:
    cells sit at the even positions of a (2H - 1) x (2W - 1) image per row, and the position between
    two of them is set when an edge connects them."""
    rows, n = connect_h.shape
    height = n // width
    image = np.zeros((rows, 2 * height - 1, 2 * width - 1), dtype=bool)
    image[:, ::2, ::2] = True
    image[:, ::2, 1::2] = connect_h.view(rows, height, width)[:, :, :-1].numpy()
    image[:, 1::2, ::2] = connect_v.view(rows, height, width)[:, :-1, :].numpy()
    labels, _ = ndimage.label(image, structure=FOUR_NEIGHBOURS_PER_MAP)
    return torch.from_numpy(labels[:, ::2, ::2].reshape(rows, n)).long() - 1


def components(connect_h: torch.Tensor, connect_v: torch.Tensor, nb, compiled: bool) -> torch.Tensor:
    """Labels [rows, n] of the connected components of each row's graph whose edges are the True
    entries of connect_h and connect_v [rows, n] (the edge to each cell's right and lower
    neighbour, in layout `nb`): cells share a label exactly when they are connected, and labels are
    distinct across rows, in [0, rows * n)."""
    if connect_h.device.type == "cpu" and not isinstance(nb, tuple):
        return _components_of_grid_by_scipy(connect_h, connect_v, nb)
    # (the packed layout's groups are a few cells each: propagation settles in a round or two,
    # cheaper than building a scipy graph)
    return _components_by_propagation(connect_h, connect_v, nb, compiled)


def _group_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values [rows, n] averaged over each group of `components` labels, written back to every member."""
    flat, index = values.reshape(-1), labels.reshape(-1)
    sums = torch.zeros_like(flat).scatter_add_(0, index, flat)
    counts = torch.zeros_like(flat).scatter_add_(0, index, torch.ones_like(flat))
    return (sums / counts.clamp(min=1)).gather(0, index).view_as(values)


def _boundary_signs(x, lh, lv, labels, nb) -> torch.Tensor:
    """c [rows, n]: sum of sign(x_i - x_j) over i's penalised neighbours j in another group."""
    dh, dv = _diff(x, nb)
    cut_h = (lh > 0) & (_right(labels, nb) != labels)
    cut_v = (lv > 0) & (_below(labels, nb) != labels)
    sh = torch.where(cut_h, torch.sign(dh), torch.zeros_like(dh))  # sign(x_right - x_left)
    sv = torch.where(cut_v, torch.sign(dv), torch.zeros_like(dv))
    return _diff_adjoint(sh, sv, nb)  # c_i = sum_j sign(x_i - x_j) = (D^T s)_i


def grid_edges(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """valid [rows, H, W] -> the grid layout's edges of two valid cells (right, down) [rows, H * W]."""
    rows = valid.shape[0]
    right = F.pad(valid[:, :, 1:] & valid[:, :, :-1], (0, 1))
    down = F.pad(valid[:, 1:, :] & valid[:, :-1, :], (0, 0, 0, 1))
    return right.reshape(rows, -1), down.reshape(rows, -1)


def tv_prox(z: torch.Tensor, lam: torch.Tensor, edge_h: torch.Tensor, edge_v: torch.Tensor, nb,
            compiled: bool = False):
    """z [rows, n] (finite), lam [rows, 1] or [rows, n] >= 0 (`TVProxFunction`), the penalised
    edges edge_h, edge_v [rows, n] of layout `nb` -> (x [rows, n], `components` labels [rows, n],
    c [rows, n]); see the module docstring. compiled: the dual steps through torch.compile."""
    lh, lv = lam.to(z.dtype) * edge_h, lam.to(z.dtype) * edge_v
    cells = (edge_h | edge_v | _left(edge_h, nb) | _above(edge_v, nb)).sum(1).clamp(min=1).to(z.dtype)
    penalty = (lh + lv).sum(1)  # lambda x number of penalised edges
    rounding = 4 * torch.finfo(z.dtype).eps * penalty * z.abs().amax(1)
    tolerance = torch.maximum(GAP_TOLERANCE.get(z.dtype, GAP_TOLERANCE[torch.float32]) * cells, rounding)
    x, gap, iterations = _dual_solve(z, lam, lh, lv, tolerance, nb, compiled)
    if not bool((gap <= tolerance).all()):
        worst = int((gap / tolerance).argmax())
        log.warning("TVMax: the TV prox stopped at its cap of %d iterations with %d of %d rows uncertified "
                    "(worst duality gap %.3g > %.3g); those rows are approximate",
                    iterations, int((gap > tolerance).sum()), z.shape[0], float(gap[worst]), float(tolerance[worst]))
    # group neighbours that the certificate cannot tell apart, then solve exactly on the groups
    reach = 2 * torch.sqrt(2 * gap.clamp(min=0)).view(-1, 1) + 4 * torch.finfo(z.dtype).eps * z.abs().amax(1, keepdim=True)
    dh, dv = _diff(x, nb)
    labels = components((lh > 0) & (dh.abs() <= reach), (lv > 0) & (dv.abs() <= reach), nb, compiled)
    c = _boundary_signs(x, lh, lv, labels, nb)
    polished = _group_mean(z - lam * c, labels)
    objective, polished_objective = _objective(x, z, lh, lv, nb), _objective(polished, z, lh, lv, nb)
    slack = 8 * torch.finfo(z.dtype).eps * objective.abs().clamp(min=1)
    better = (polished_objective <= objective + slack).view(-1, 1)
    return torch.where(better, polished, x), labels, c


class TVProxFunction(torch.autograd.Function):
    """`tv_prox` with gradients for z [rows, n] and lam: [rows, 1], or [rows, n] with one lambda per
    cell, equal over each connected part of a row (several independent problems laid out in one)."""

    @staticmethod
    def forward(ctx, z, lam, edge_h, edge_v, nb, compiled: bool):
        x, labels, c = tv_prox(z.detach(), lam.detach(), edge_h, edge_v, nb, compiled)
        ctx.save_for_backward(labels, c)
        ctx.lam_per_cell = lam.shape[1] != 1
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        labels, c = ctx.saved_tensors
        dz = _group_mean(g, labels)
        dlam = None
        if ctx.needs_input_grad[1]:
            dlam = -(c * dz) if ctx.lam_per_cell else -(c * dz).sum(1, keepdim=True)
        return dz, dlam, None, None, None, None
