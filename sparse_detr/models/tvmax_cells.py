"""TVmax of rows of scores, solved on the cells that can be nonzero.

TVmax(z) = sparsemax(prox_TV(z)) on each row's grid (`tv_prox`). At the optimum
p = sparsemax(z - D^T u) for a dual u with |u_e| <= lambda, so each cell's score moves by at most
lambda x its number of neighbours (<= 4). Sparsemax's threshold grows with its input, so it is at
least tau(z) - 4 lambda, and a cell with z_i <= tau(z) - 8 lambda gets 0 (`cells_in_play`).
With those cells fixed at 0, each edge from a cell in play to a valid cell out of play adds
lambda p_i to the objective: the same problem on the cells in play alone, their own edges, and
scores z_i - lambda (edges out of play). Attention rows put weight on few cells, so the cells in
play are packed into [rows, K] slots (`_packed_layout`) and the prox's passes touch K cells
instead of H * W. The answer, and its gradient, are those of the whole grid.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from sparse_detr.models.sparse_solver import SPARSEMAX
from sparse_detr.models.tv_prox import TVProxFunction, grid_edges

# Pack when the busiest row has fewer cells in play than this share of the grid (beyond it, the
# whole grid's shifts cost less than the packed layout's gathers and the packing itself).
PACK_SHARE = 0.5
_NEG_INF = float("-inf")


def tvmax_on_grid(x: torch.Tensor, lam: torch.Tensor, width: int, compiled: bool) -> torch.Tensor:
    """TVmax of x [rows, H * W] (padded keys -inf) on each row's whole grid of valid cells, lam [rows, 1]."""
    rows = x.shape[0]
    valid = x > _NEG_INF
    edge_h, edge_v = grid_edges(valid.view(rows, -1, width))
    prox = TVProxFunction.apply(torch.where(valid, x, 0.0), lam, edge_h, edge_v, width, compiled)
    return SPARSEMAX.rows(prox.masked_fill(~valid, _NEG_INF), compiled=compiled)


def cells_in_play(x: torch.Tensor, lam: torch.Tensor, compiled: bool) -> torch.Tensor:
    """The cells of x [rows, n] (padded keys -inf) that can be nonzero in TVmax(x): a superset of
    the support (see the module docstring), with a margin for rounding in the threshold."""
    with torch.no_grad():
        top = x.amax(1, keepdim=True)
        tau = top - SPARSEMAX.solve(x, None, compiled=compiled).amax(1, keepdim=True)
        margin = 64 * torch.finfo(x.dtype).eps * (top.abs() + tau.abs() + 8 * lam + 1)
        return x > tau - 8 * lam - margin


class _Packing(NamedTuple):
    """Where the cells in play sit in the packed layout. Each cell in play is an entry (its row,
    its cell in the grid, its slot); in each row the cells with a neighbour in play come first, so
    the prox only runs on the first `coupled_slots` slots (the others are alone: prox = score)."""
    row: torch.Tensor            # [entries]
    cell: torch.Tensor           # [entries]
    slot: torch.Tensor           # [entries]
    out_of_play: torch.Tensor    # [entries]: valid grid neighbours not in play
    slots: int                   # K: the most cells in play in a row + 1 (slot K - 1 is padding everywhere)
    coupled_slots: int           # the most coupled cells in a row + 1
    nb: tuple                    # (right, down, left, up) slots [rows, coupled_slots]; none: coupled_slots - 1


def _packed_layout(x: torch.Tensor, in_play: torch.Tensor, width: int) -> _Packing:
    """The packed `tv_prox` layout of the cells in play [rows, n] of x (padded keys -inf).
    A neighbour that is not in play points at slot coupled_slots - 1, which has no edge in any row.
    Entries come sorted by (row, cell): a horizontal neighbour in play is the next or previous entry."""
    rows, n = in_play.shape
    row, cell = in_play.nonzero(as_tuple=True)
    key = row * n + cell  # sorted
    entries = torch.arange(key.numel(), device=x.device)
    entry_of_cell = torch.full((rows * n,), -1, dtype=torch.int32, device=x.device)
    entry_of_cell[key] = entries.to(torch.int32)
    column = cell % width
    moves = ((1, column < width - 1), (width, cell < n - width), (-1, column > 0), (-width, cell >= width))
    neighbour_entry, in_play_neighbours, valid_neighbours = [], [], 0
    for offset, exists in moves:
        target = torch.where(exists, key + offset, key)  # the cell itself where the grid has no neighbour
        if abs(offset) == 1:  # a horizontal neighbour in play is the next or previous entry
            found = (entries + offset).clamp(0, key.numel() - 1)
            in_play_neighbours.append(exists & (key.take(found) == target))
        else:
            found = entry_of_cell.take(target).long()
            in_play_neighbours.append(exists & (found >= 0))
        neighbour_entry.append(found.clamp(min=0))
        valid_neighbours = valid_neighbours + (exists & (x.take(target) > _NEG_INF)).long()
    coupled = in_play_neighbours[0] | in_play_neighbours[1] | in_play_neighbours[2] | in_play_neighbours[3]
    out_of_play = valid_neighbours - sum(flag.long() for flag in in_play_neighbours)

    def rank_in_row(flag):  # position of each flagged entry among its row's flagged entries
        per_row = torch.zeros(rows, dtype=torch.int64, device=x.device).index_add_(0, row, flag.long())
        return flag.long().cumsum(0) - 1 - (per_row.cumsum(0) - per_row).take(row), per_row

    coupled_rank, coupled_per_row = rank_in_row(coupled)
    alone_rank, alone_per_row = rank_in_row(~coupled)
    slot = torch.where(coupled, coupled_rank, coupled_per_row.take(row) + alone_rank)
    slots = int((coupled_per_row + alone_per_row).max()) + 1
    coupled_slots = int(coupled_per_row.max()) + 1
    none = coupled_slots - 1
    where = row * slots + slot
    nb = tuple(torch.full((rows * slots,), none, dtype=torch.int64, device=x.device)
               .index_put_((where,), torch.where(in_play_neighbour, slot.take(found), none))
               .view(rows, slots)[:, :coupled_slots].clone()
               for found, in_play_neighbour in zip(neighbour_entry, in_play_neighbours))
    return _Packing(row, cell, slot, out_of_play, slots, coupled_slots, nb)


def tvmax_rows(x: torch.Tensor, lam: torch.Tensor, width: int, compiled: bool) -> torch.Tensor:
    """TVmax of x [rows, H * W] (padded keys -inf), lam [rows, 1]: on the packed cells in play
    when few are (see the module docstring), else on the whole grid."""
    rows, n = x.shape
    in_play = cells_in_play(x, lam, compiled)
    if int(in_play.sum(1).max()) >= PACK_SHARE * n:
        return tvmax_on_grid(x, lam, width, compiled)
    pack = _packed_layout(x, in_play, width)
    where = (pack.row, pack.slot)
    entry_scores = x[pack.row, pack.cell] - lam[pack.row, 0] * pack.out_of_play
    scores = torch.zeros(rows, pack.slots, dtype=x.dtype, device=x.device).index_put(where, entry_scores)
    filled = torch.zeros(rows, pack.slots, dtype=torch.bool, device=x.device).index_put_(where, torch.ones_like(pack.row, dtype=torch.bool))
    none = pack.coupled_slots - 1
    coupled = scores[:, :pack.coupled_slots].clone()  # (not a view: a view makes the kernel recompile)
    prox = torch.cat([TVProxFunction.apply(coupled, lam, pack.nb[0] != none, pack.nb[1] != none, pack.nb, compiled),
                      scores[:, pack.coupled_slots:]], 1)
    p = SPARSEMAX.rows(prox.masked_fill(~filled, _NEG_INF), compiled=compiled)
    return torch.zeros(rows, n, dtype=p.dtype, device=p.device).index_put((pack.row, pack.cell), p[where])
