"""Exact threshold solvers for sparsemax, entmax-1.5 and alpha-entmax over the last dim.

All three mappings are p_i = [z_i - tau]_+ ^ q with z = (alpha - 1) (x - max x), q = 1 / (alpha - 1)
and the threshold tau chosen so that sum(p) = 1 (alpha = 2: sparsemax, alpha = 1.5: entmax-1.5).
The entmax package finds tau by sorting (slow on CPU) or by 25-50 bisection passes; here a few
Newton passes find it. Every pass is elementwise math plus row sums, which `torch.compile` turns
into one vectorised loop, and nothing of the scores' size is stored except the output.

Why this is fast and exact (c = [z - tau]_+):
- Newton runs on phi(tau) = ||c||_q - 1, convex and decreasing, so from below it rises
  monotonically without overshooting. The q-norm (rather than sum(c^q) - 1) is nearly linear
  in tau for every alpha, and exactly piecewise linear for sparsemax, where Newton is exact
  once the support stops changing.
- Start: tau* >= -1 (z is shifted to max 0), and for any set T of entries, by the power-mean
  inequality, tau* >= mean_T(z) - |T|^(-1/q). The best of a few nested sets T = {z > level} is a
  start close to tau*, so 2-4 passes usually suffice.
- Sparsemax and entmax-1.5 end with the closed-form threshold on the support Newton found (the
  formula the sort-based algorithm uses); it is certified exact when it keeps the same support,
  which the largest z outside and the smallest z inside that support, found in the same pass,
  tell without another pass. alpha-entmax pays a log and an exp per element per pass, so it takes Halley steps
  (cubic; the extra derivative costs one division) and is certified when sum(p) = 1 to rounding.
- Rows without a certificate continue from their last threshold, on those rows only; rows still
  uncertified after RETRIES rounds (float32 rounding can flip between two supports forever) are
  solved by the sort-based algorithm or by bisection. On CUDA those rows are picked on the
  device, a fixed number per stage, so no call waits for the host (`_finish_on_device`).
Each mapping's solver is one ThresholdSolver object (SPARSEMAX, ENTMAX15, ALPHA_ENTMAX) holding
its passes per round, forward kernel, exact fallback and backward.
Backward needs only the output p: with w = p^(2 - alpha) (the support indicator for sparsemax),
dx = w * (g - sum(g w) / sum(w)); the alpha gradient is the closed form of Correia et al. 2019
(as in entmax.EntmaxBisectFunction), reduced to row sums.
"""

from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from sparse_detr.models.compiled_kernel import run_kernel
from sparse_detr.models.exact_threshold import bisect_tau, sort_tau


RETRIES = 2
# Rows per stage of `_finish_on_device`: a fixed share of the rows, at least a few.
ON_DEVICE_MIN_ROWS, ON_DEVICE_SHARE = 16, 32
# device -> rows left uncertified by `_finish_on_device` (capacity exceeded), summed on the device.
UNCERTIFIED: dict[torch.device, torch.Tensor] = {}


def on_device_capacity(rows: int) -> int:
    """Rows that each later round and the fallback take when selected on the device."""
    return min(rows, max(ON_DEVICE_MIN_ROWS, rows // ON_DEVICE_SHARE))


def check_uncertified() -> int:
    """Rows the on-device path left inexact since the last check (one host read per device; the
    trainer calls it once per step, after the loss is read anyway). If any, warn and give the
    later rounds twice the rows from now on."""
    global ON_DEVICE_SHARE
    left = sum(int(counter.item()) for counter in UNCERTIFIED.values())
    UNCERTIFIED.clear()
    if left:
        ON_DEVICE_SHARE = max(1, ON_DEVICE_SHARE // 2)
        warnings.warn(f"sparse_detr: {left} attention rows were not solved exactly in this step; from now on "
                      f"1/{ON_DEVICE_SHARE} of the rows get the exact fallback", RuntimeWarning, stacklevel=2)
    return left
# Nested candidate sets {z > level} for the starting lower bound (the support lies in (-1, 0]).
_LEVELS = (-1.0, -0.5, -0.25)


# --- forward kernels: rows x [rows, n], alpha [rows, 1] or None, tau0 [rows, 1] a lower bound
# --- (or a previous iterate) -> (p, ok [rows, 1]: certified, tau [rows, 1] to continue from)


def _same_shape(x: torch.Tensor, *others) -> None:
    """Tell the compiler that the other tensors' rows (and columns, if any) are x's.

    Without duck sizing each input's sizes are separate symbols; once they are known equal,
    inductor runs all passes of a row in one loop over the rows, the row in cache."""
    for t in others:
        if t is not None:
            for dim in range(t.dim()):
                if t.shape[dim] != 1:
                    torch._check(t.shape[dim] == x.shape[dim])


def _shifted(x: torch.Tensor, alpha) -> torch.Tensor:
    """z = (alpha - 1) (x - max), clipped below at -2: since tau* >= -1, no entry <= -1 is in
    the support, and -2 keeps the clipped entries clear of the threshold (no rounding ties).

    The clip keeps -inf (masked keys) out of every sum; a row of only -inf becomes all -2 and
    yields p = 0. Shifting first keeps the differences exact at every score scale."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    return ((x - m) * (alpha - 1)).clamp(min=-2.0)


def _start(z: torch.Tensor, q, tau0: torch.Tensor) -> torch.Tensor:
    """Lower bound on tau*: the best of tau0, -1 and mean_T(z) - |T|^(-1/q), T = {z > level}."""
    tau = tau0.clamp(min=-1.0)
    for level in _LEVELS:
        inside = z > level
        k = inside.to(z.dtype).sum(-1, keepdim=True).clamp(min=1)
        mean = torch.where(inside, z, torch.zeros_like(z)).sum(-1, keepdim=True) / k
        tau = torch.maximum(tau, mean - k ** (-1 / q))
    return tau


def _support_moments(z: torch.Tensor, tau: torch.Tensor, squares: bool):
    """Over the support S = {z > tau}: size, sum, sum of squares (or None); and the bracket
    (largest z outside S, smallest z inside S), -inf / inf when empty.

    The bracket certifies a threshold t computed from these moments without another pass:
    outside <= t < inside means the support of t is S, so t is exact."""
    inside = z > tau
    zs = torch.where(inside, z, torch.zeros_like(z))
    k = inside.to(z.dtype).sum(-1, keepdim=True)
    z_in = torch.where(inside, z, torch.full_like(z, float("inf"))).amin(-1, keepdim=True)
    z_out = torch.where(inside, torch.full_like(z, float("-inf")), z).amax(-1, keepdim=True)
    s2 = (zs * zs).sum(-1, keepdim=True) if squares else None
    return k, zs.sum(-1, keepdim=True), s2, (z_out, z_in)


def _sparsemax_forward(x, alpha, tau0, steps: int):
    """Newton (Michelot) steps tau <- (sum_S z - 1) / |S|; exact once S stops changing."""
    _same_shape(x, tau0)
    z = _shifted(x, 2.0)
    tau = _start(z, 1.0, tau0)
    ok = torch.zeros_like(tau, dtype=torch.bool)
    for _ in range(steps):
        k, s, _, (z_out, z_in) = _support_moments(z, tau, squares=False)
        tau = (s - 1) / k.clamp(min=1)
        ok = (z_out <= tau) & (tau < z_in)
    return (z - tau).clamp(min=0), ok, tau


def _entmax15_forward(x, alpha, tau0, steps: int):
    """Newton on ||c||_2 = 1 (steps - 1 times), then the exact quadratic root on the support."""
    _same_shape(x, tau0)
    z = _shifted(x, 1.5)
    tau = _start(z, 2.0, tau0)
    ok = torch.zeros_like(tau, dtype=torch.bool)
    root = tau
    for i in range(steps):
        k, s1, s2, (z_out, z_in) = _support_moments(z, tau, squares=True)
        if i < steps - 1:  # ||c||^2 = s2 - 2 tau s1 + k tau^2, d||c||/dtau = -sum(c) / ||c||
            norm = (s2 - 2 * tau * s1 + k * tau * tau).clamp(min=0).sqrt()
            tau = tau + (norm - 1) * norm / (s1 - k * tau).clamp(min=torch.finfo(z.dtype).tiny)
        else:  # sum_S (z - root)^2 = 1; may overshoot, so Newton's tau stays the lower bound
            kc = k.clamp(min=1)
            mean = s1 / kc
            root = mean - ((1 - (s2 - s1 * mean)) / kc).clamp(min=0).sqrt()
            ok = (z_out <= root) & (root < z_in)
    c = (z - root).clamp(min=0)
    return c * c, ok, tau


def _alpha_forward(x, alpha, tau0, steps: int):
    """Halley steps on ||c||_q = 1, then p at the last tau: certified when sum(p) = 1 to
    rounding, and not renormalised, so writing p and summing it is a single pass."""
    _same_shape(x, alpha, tau0)
    z = _shifted(x, alpha)
    q = 1 / (alpha - 1)
    tau = _start(z, q, tau0)
    for i in range(steps + 1):
        c = (z - tau).clamp(min=0)
        d = torch.where(c > 0, torch.exp((q - 1) * torch.log(c)), torch.zeros_like(c))  # c^(q-1)
        p = d * c
        total = p.sum(-1, keepdim=True)
        if i == steps:
            break
        a = d.sum(-1, keepdim=True)
        b = torch.where(c > 0, d / c, torch.zeros_like(c)).sum(-1, keepdim=True)  # sum c^(q-2)
        # phi = N - 1, N = total^(1/q); phi' = -a / N^(q-1); phi'' = (q-1) N^(1-q) (b - a^2 / total)
        norm = total ** (1 / q)
        newton = (norm - 1) * norm ** (q - 1) / a
        curvature = (norm - 1) * (q - 1) * norm ** (q - 1) * (b - a * a / total) / (a * a)
        halley = newton / (1 - curvature / 2)
        use_halley = (curvature < 1) & torch.isfinite(halley)
        tau = tau + torch.where(use_halley, halley, newton).nan_to_num(0.0)
    tol = 8 * torch.finfo(x.dtype).eps * torch.clamp(q, min=1)
    ok = ((total - 1).abs() <= tol) | (total == 0)  # total == 0: a row of only -inf
    return p, ok, tau


# --- backward: output p, upstream gradient g [rows, n] -------------------------------------------


def _dx(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    _same_shape(w, g)
    gw = g * w
    return gw - w * (gw.sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny))


def _sparsemax_backward(p, g):
    return _dx((p > 0).to(p.dtype), g)


def _entmax15_backward(p, g):
    return _dx(p.sqrt(), g)


def _alpha_backward_sums(p, g, alpha, need_alpha: bool):
    """w = p^(2-alpha), r = sum(g w) / sum(w) and d alpha [rows, 1] (or None) in one pass.

    w is returned (not recomputed) because it costs a log and an exp per element."""
    _same_shape(p, g, alpha)
    positive = p > 0
    logp = torch.where(positive, torch.log(p), torch.zeros_like(p))
    w = torch.where(positive, torch.exp((2 - alpha) * logp), torch.zeros_like(p))
    r = (g * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    if not need_alpha:
        return w, r, None
    # d alpha = sum g [(p - w/sw) / (alpha-1)^2 - (p log p - w/sw H) / (alpha-1)], H = sum p log p
    plogp = p * logp
    am1 = alpha - 1
    gp = (g * p).sum(-1, keepdim=True)
    gplogp = (g * plogp).sum(-1, keepdim=True)
    ent = plogp.sum(-1, keepdim=True)
    return w, r, (gp - r) / (am1 * am1) - (gplogp - r * ent) / am1


def _alpha_backward_dx(w, g, r):
    """dx = w (g - r), written over w."""
    _same_shape(w, g, r)
    return w.mul_(g - r)


class ThresholdSolver:
    """One mapping's solver: passes per round, the forward kernel, the exact fallback for rows
    left uncertified, and the backward pass. Subclasses fill these in; `rows` runs them."""

    steps: int  # passes per round: enough for typical attention rows, so most calls need one round

    @staticmethod
    def kernel(x, alpha, tau0, steps: int):
        """Rows x [rows, n], alpha [rows, 1] or None, tau0 [rows, 1] a lower bound (or a previous
        iterate) -> (p, ok [rows, 1]: certified, tau [rows, 1] to continue from)."""
        raise NotImplementedError

    def exact(self, x: torch.Tensor, alpha) -> torch.Tensor:
        """The mapping of rows x by an exact algorithm (eager; only rows never certified)."""
        raise NotImplementedError

    def backward(self, p, g, alpha, need_alpha: bool, compiled: bool):
        """Output p and upstream gradient g [rows, n] -> (dx [rows, n], d alpha [rows, 1] or None)."""
        raise NotImplementedError

    def alpha_rows(self, alpha, x: torch.Tensor):
        """alpha as the kernels take it for x [..., n]: None for a fixed-alpha solver."""
        return None

    def solve(self, x: torch.Tensor, alpha, *, compiled: bool, steps: int | None = None,
              on_device: bool | None = None) -> torch.Tensor:
        """The mapping of rows x [rows, n] (alpha [rows, 1] or None).

        Rounds of `steps` passes (default self.steps); each round after the first continues the
        uncertified rows only, and the exact fallback takes whatever is left after RETRIES.
        on_device (default: x on CUDA) selects those rows without reading anything back to the
        host (`_finish_on_device`); on the CPU branching on `ok` is cheap and skips all of it."""
        steps = self.steps if steps is None else steps
        x, alpha = x.detach(), None if alpha is None else alpha.detach()  # one kernel whatever requires grad
        p, ok, tau = run_kernel(self.kernel, x, alpha, x.new_full((x.shape[0], 1), -1.0), steps, compiled=compiled)
        if x.is_cuda if on_device is None else on_device:
            return self._finish_on_device(x, alpha, p, ok, tau, steps, compiled)
        if ok.all():
            return p
        todo = (~ok).squeeze(-1).nonzero().squeeze(-1)
        tau = tau[todo]
        for _ in range(RETRIES):
            if todo.numel() == 0:
                return p
            if todo.numel() == 1:  # a size-1 dim would make dynamo specialise, i.e. recompile
                todo, tau = todo.repeat(2), tau.repeat(2, 1)
            a = None if alpha is None else alpha[todo]
            p_todo, ok, tau = run_kernel(self.kernel, x[todo], a, tau, steps, compiled=compiled)
            p[todo] = p_todo
            keep = (~ok).squeeze(-1)
            todo, tau = todo[keep], tau[keep]
        if todo.numel():
            p[todo] = self.exact(x[todo], None if alpha is None else alpha[todo])
        return p

    def _finish_on_device(self, x, alpha, p, ok, tau, steps: int, compiled: bool) -> torch.Tensor:
        """The later rounds and the fallback of `solve` on a fixed number of rows, chosen on the
        device (top-k of the uncertified flags), so a GPU never waits for the host.

        Each stage takes `on_device_capacity(rows)` rows, uncertified ones first, and keeps the
        result of rows certified before. Rows beyond the capacity still uncertified at the end
        (none in practice) are added to `UNCERTIFIED`, a device counter for the caller to read
        once per step."""
        capacity = on_device_capacity(x.shape[0])

        def candidates():
            idx = torch.topk((~ok).squeeze(-1).to(x.dtype), capacity, sorted=False).indices
            return idx, ok.index_select(0, idx)

        def pick(t, idx):
            return None if t is None else t.index_select(0, idx)

        for _ in range(RETRIES):
            idx, done = candidates()
            p_new, ok_new, tau_new = run_kernel(self.kernel, pick(x, idx), pick(alpha, idx), pick(tau, idx), steps,
                                                compiled=compiled)
            p.index_copy_(0, idx, torch.where(done, p.index_select(0, idx), p_new))
            tau.index_copy_(0, idx, torch.where(done, tau.index_select(0, idx), tau_new))
            ok.index_copy_(0, idx, done | ok_new)
        idx, done = candidates()
        p.index_copy_(0, idx, torch.where(done, p.index_select(0, idx), self.exact(pick(x, idx), pick(alpha, idx))))
        ok.index_fill_(0, idx, True)
        if x.device not in UNCERTIFIED:
            UNCERTIFIED[x.device] = torch.zeros((), dtype=torch.int64, device=x.device)
        UNCERTIFIED[x.device].add_((~ok).sum())
        return p

    def rows(self, x: torch.Tensor, alpha=None, *, compiled: bool, steps: int | None = None,
             on_device: bool | None = None) -> torch.Tensor:
        """The mapping over the last dim of x [..., n]; alpha as `alpha_rows` takes it."""
        rows = x.reshape(-1, x.shape[-1])
        return EntmaxFunction.apply(rows, self.alpha_rows(alpha, x), self, compiled, steps, on_device).view(x.shape)


class _SortSolver(ThresholdSolver):
    """A fixed alpha with a closed-form threshold on a known support (sparsemax, entmax-1.5)."""
    alpha: float

    def exact(self, x, alpha):
        z = _shifted(x, self.alpha)
        q = 1 / (self.alpha - 1)
        return (z - sort_tau(z, q)).clamp(min=0) ** q


class SparsemaxSolver(_SortSolver):
    steps, alpha, kernel = 3, 2.0, staticmethod(_sparsemax_forward)

    def backward(self, p, g, alpha, need_alpha, compiled):
        return run_kernel(_sparsemax_backward, p, g, compiled=compiled), None


class Entmax15Solver(_SortSolver):
    steps, alpha, kernel = 3, 1.5, staticmethod(_entmax15_forward)

    def backward(self, p, g, alpha, need_alpha, compiled):
        return run_kernel(_entmax15_backward, p, g, compiled=compiled), None


class AlphaEntmaxSolver(ThresholdSolver):
    """alpha-entmax at any alpha in (1, 2], one per row; bisection as the exact fallback."""
    steps, kernel = 2, staticmethod(_alpha_forward)

    def alpha_rows(self, alpha, x):
        """alpha: a float, or a tensor broadcastable to x[..., :1] (e.g. [1, heads, 1, 1]) -> [rows, 1]."""
        if not torch.is_tensor(alpha):  # filled on the device (no copy from the host); exact in float64
            return x.new_full((x[..., 0].numel(), 1), float(alpha))
        return alpha.to(x.dtype).expand(*x.shape[:-1], 1).reshape(-1, 1).contiguous()

    def exact(self, x, alpha):
        z = _shifted(x, alpha)
        q = 1 / (alpha - 1)
        p = (z - bisect_tau(z, q, iters=30 if x.dtype == torch.float32 else 60)).clamp(min=0) ** q
        return p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)

    def backward(self, p, g, alpha, need_alpha, compiled):
        w, r, da = run_kernel(_alpha_backward_sums, p, g, alpha, need_alpha, compiled=compiled)
        return run_kernel(_alpha_backward_dx, w, g, r, compiled=compiled), da


class EntmaxFunction(torch.autograd.Function):
    """Rows x [rows, n] -> p [rows, n] by `solver`; alpha [rows, 1] or None.

    Saves only p (like softmax), so the memory held for backward matches softmax's."""

    @staticmethod
    def forward(ctx, x, alpha, solver: ThresholdSolver, compiled: bool, steps: int | None, on_device: bool | None):
        p = solver.solve(x, alpha, compiled=compiled, steps=steps, on_device=on_device)
        ctx.solver, ctx.compiled = solver, compiled
        ctx.save_for_backward(p, alpha)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        p, alpha = ctx.saved_tensors
        dx, da = ctx.solver.backward(p, g.contiguous(), alpha, ctx.needs_input_grad[1], ctx.compiled)
        return dx, da, None, None, None, None


SPARSEMAX, ENTMAX15, ALPHA_ENTMAX = SparsemaxSolver(), Entmax15Solver(), AlphaEntmaxSolver()
