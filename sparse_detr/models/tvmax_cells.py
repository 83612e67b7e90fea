"""TVmax of rows of scores, solved on the cells that can be nonzero.

TVmax(z) = sparsemax(prox_TV(z)) on each row's grid (`tv_prox`). At the optimum
p = sparsemax(z - D^T u) for a dual u with |u_e| <= lambda, so each cell's score moves by at most
lambda x its number of neighbours (<= 4). Sparsemax's threshold grows with its input, so it is at
least tau(z) - 4 lambda, and a cell with z_i <= tau(z) - 8 lambda gets 0 (`_screening_threshold`).
With those cells fixed at 0, each edge from a cell in play to a valid cell out of play adds
lambda p_i to the objective: the same problem on the cells in play alone, their own edges, and
scores z_i - lambda (edges out of play). Attention rows put weight on few cells: the cells in play
are packed per row for the sparsemax, and the prox runs only on those with a neighbour in play:
pairs in closed form, larger groups laid out back to back (`_packed_layout`), so its passes touch
a few cells per row instead of H * W. The answer, and its gradient, are those of the whole grid.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from sparse_detr.models.compiled_kernel import run_kernel
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


# Newton steps towards sparsemax's threshold for the screening (any number is exact: each step
# stays below the threshold, and more steps only leave fewer cells in play).
_SCREEN_STEPS = 3


def _screening_threshold(x: torch.Tensor, lam: torch.Tensor):
    """(t [rows, 1], number of cells of x above t [rows]): t = a lower bound on sparsemax's
    threshold tau(x) - 8 lam - a margin for rounding. Newton on sum(max(x - tau, 0)) = 1 from
    tau = max(x) - 1 (a lower bound: no p_i exceeds 1) rises towards tau(x) but never past it
    (the cells above an iterate hold every cell of the support)."""
    top = x.amax(1, keepdim=True)
    tau = top - 1
    for _ in range(_SCREEN_STEPS):
        inside = x > tau
        count = inside.to(x.dtype).sum(1, keepdim=True).clamp(min=1)
        tau = (torch.where(inside, x, 0.0).sum(1, keepdim=True) - 1) / count
    margin = 64 * torch.finfo(x.dtype).eps * (top.abs() + tau.abs() + 8 * lam + 1)
    threshold = tau - 8 * lam - margin
    # (counted here as int32: a bool tensor written by the compiled kernel is slow, and summing
    # one outside it converts it to int64 first)
    return threshold, (x > threshold).to(torch.int32).sum(1)


class _Packing(NamedTuple):
    """Where the cells in play sit. Each cell in play is an entry: its row, its place in the flat
    scores [rows * n] and its slot in the row's packed scores [rows, K] (for the sparsemax). The
    prox only needs the cells with a neighbour in play. Most of those come in pairs joined by one
    edge and nothing else (`pairs`: a closed form, `_pair_prox`); the others ("coupled") go to the
    iterative prox. Rows share nothing, so those are laid out back to back in bins of about
    `_BIN_CELLS`, a row never split: entry `coupled[k]` at `at[k]` of the flat [bins * width] layout."""
    row: torch.Tensor            # [entries]
    key: torch.Tensor            # [entries]: row * n + cell
    slot: torch.Tensor           # [entries]
    out_of_play: torch.Tensor    # [entries]: valid grid neighbours not in play
    slots: int                   # K: the most cells in play in a row
    pairs: tuple                 # (first, second) [pairs]: the entries of each pair
    coupled: torch.Tensor        # [coupled entries]: their entry numbers
    at: torch.Tensor             # [coupled entries]: their positions in the bins
    bins: int
    width: int
    nb: tuple                    # (right, down, left, up) positions [bins, width]; none: width - 1


_BIN_CELLS = 64


_ALONE, _PAIR_FIRST, _PAIR_SECOND, _COUPLED = range(4)


def _entry_neighbours(key: torch.Tensor, entry_of_cell: torch.Tensor, valid: torch.Tensor, image_start: torch.Tensor,
                      n: int, width: int):
    """For the entries at flat places key [entries] (sorted) of rows of n cells: (their (right,
    down, left, up) neighbours' entries [4, entries], -1 where not in play; their valid neighbours
    out of play [entries]; their kind [entries]: alone, first or second of a pair (two entries that
    are each other's only neighbour in play), or coupled to more).

    entry_of_cell [rows * n] holds each entry's number at its place and anything elsewhere: a
    number counts where its entry's place is the cell asked for (so the table needs no filling).
    valid [images * n]: the cells of each image's grid that are not padding; an entry's image
    starts at image_start [entries] there (a small table, where reading the scores' own -inf
    would pull all of them through the cache)."""
    last = key.shape[0] - 1
    entries = torch.arange(key.shape[0], device=key.device)
    cell = key % n
    column = cell % width
    moves = ((1, column < width - 1), (width, cell < n - width), (-1, column > 0), (-width, cell >= width))
    neighbours, valid_neighbours = [], 0
    for offset, exists in moves:
        target = torch.where(exists, key + offset, key)  # the cell itself where the grid has no neighbour
        if abs(offset) == 1:  # a horizontal neighbour in play is the next or previous entry
            found = (entries + offset).clamp(0, last)
        else:
            found = entry_of_cell[target].long().clamp(0, last)
        neighbours.append(torch.where(exists & (key[found] == target), found, -1))
        valid_neighbours = valid_neighbours + (exists & valid[image_start + cell + target - key]).long()
    neighbour = torch.stack(neighbours)
    degree = (neighbour >= 0).long().sum(0)
    partner = neighbour.amax(0)
    in_pair = (degree == 1) & (degree[partner.clamp(min=0)] == 1)
    kind = torch.where(in_pair, torch.where(partner > entries, _PAIR_FIRST, _PAIR_SECOND),
                       torch.where(degree > 0, _COUPLED, _ALONE))
    return neighbour, valid_neighbours - degree, kind


def _packed_layout(x: torch.Tensor, row: torch.Tensor, cell: torch.Tensor, in_row: torch.Tensor, width: int,
                   images: int, compiled: bool = False) -> _Packing:
    """The packed layout of the cells in play (row, cell) of x [rows, n] (padded keys -inf; the
    rows of `images` images one after another, sharing their image's padding), sorted, in_row
    [rows] of them in each row. An entry's slot is its rank in its row."""
    rows, n = x.shape
    key = row * n + cell
    entries = torch.arange(key.numel(), device=x.device)
    entry_of_cell = torch.empty(rows * n, dtype=torch.int32, device=x.device)
    entry_of_cell[key] = entries.to(torch.int32)
    valid = (x.detach().view(images, -1, n)[:, 0] > _NEG_INF).reshape(-1)
    image_start = row.div(rows // images, rounding_mode="floor") * n
    neighbour, out_of_play, kind = run_kernel(_entry_neighbours, key, entry_of_cell, valid, image_start, n, width,
                                              compiled=compiled)
    first = (kind == _PAIR_FIRST).nonzero().squeeze(1)
    coupled = (kind == _COUPLED).nonzero().squeeze(1)

    slot = entries - (in_row.cumsum(0) - in_row).take(row)
    coupled_row = row.take(coupled)
    coupled_in_row = torch.zeros(rows, dtype=torch.int64, device=x.device).index_add_(
        0, coupled_row, torch.ones_like(coupled_row))
    coupled_before = coupled_in_row.cumsum(0) - coupled_in_row  # coupled entries in the rows above
    most_coupled, all_coupled = int(coupled_in_row.max()), coupled.numel()
    capacity = max(_BIN_CELLS, most_coupled)
    # (at least two bins: the compiled kernel would specialise on one)
    bins, bin_width = max(2, -(-all_coupled // capacity)), capacity + most_coupled + 1  # last position: none
    row_start = coupled_before.div(capacity, rounding_mode="floor") * bin_width + coupled_before % capacity
    at = row_start.take(coupled_row) + torch.arange(all_coupled, device=x.device) - coupled_before.take(coupled_row)
    at_of_entry = torch.zeros_like(entries).index_put_((coupled,), at)
    none = bin_width - 1
    nb = tuple(torch.full((bins * bin_width,), none, dtype=torch.int64, device=x.device)
               .index_put_((at,), torch.where(found >= 0, at_of_entry.take(found.clamp(min=0)) % bin_width, none))
               .view(bins, bin_width)
               for found in neighbour[:, coupled])
    return _Packing(row, key, slot, out_of_play, int(in_row.max()), (first, neighbour[:, first].amax(0)),
                    coupled, at, bins, bin_width, nb)


def _pair_prox(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The TV prox of two cells joined by one edge, scores a and b: they meet at their mean when
    |a - b| <= 2 lam, else each moves lam towards the other (differentiable as written)."""
    merged = (a - b).abs() <= 2 * lam
    mean, step = (a + b) / 2, lam * torch.sign(a - b)
    return torch.where(merged, mean, a - step), torch.where(merged, mean, b + step)


def tvmax_rows(x: torch.Tensor, lam: torch.Tensor, width: int, compiled: bool, images: int) -> torch.Tensor:
    """TVmax of x [rows, H * W] (padded keys -inf), lam [rows, 1]: on the packed cells in play
    when few are (see the module docstring), else on the whole grid. The rows are those of
    `images` images one after another, and the rows of an image share its key padding."""
    rows, n = x.shape
    threshold, in_row = run_kernel(_screening_threshold, x.detach(), lam.detach(), compiled=compiled)
    if int(in_row.max()) >= PACK_SHARE * n:
        return tvmax_on_grid(x, lam, width, compiled)
    row, cell = (x.detach() > threshold).nonzero(as_tuple=True)  # the cells in play, sorted
    pack = _packed_layout(x, row, cell, in_row, width, images, compiled)
    entry_lam = lam[:, 0].take(pack.row)
    scores = x.take(pack.key) - entry_lam * pack.out_of_play
    first, second = pack.pairs
    solved, values = [first, second], list(_pair_prox(scores[first], scores[second], entry_lam[first]))
    if pack.coupled.numel():
        cells = pack.bins * pack.width
        prox_input = torch.zeros(cells, dtype=x.dtype, device=x.device).index_put_((pack.at,), scores[pack.coupled])
        cell_lam = torch.zeros(cells, dtype=x.dtype, device=x.device).index_put_((pack.at,), entry_lam[pack.coupled])
        none = pack.width - 1
        prox = TVProxFunction.apply(prox_input.view(pack.bins, pack.width), cell_lam.view(pack.bins, pack.width),
                                    pack.nb[0] != none, pack.nb[1] != none, pack.nb, compiled)
        solved.append(pack.coupled)
        values.append(prox.reshape(-1)[pack.at])
    scores = scores.index_put((torch.cat(solved),), torch.cat(values))
    where = (pack.row, pack.slot)
    packed = torch.full((rows, pack.slots), _NEG_INF, dtype=x.dtype, device=x.device).index_put_(where, scores)
    p = SPARSEMAX.rows(packed, compiled=compiled)
    return torch.zeros(rows * n, dtype=p.dtype, device=p.device).index_put_((pack.key,), p[where]).view(rows, n)
