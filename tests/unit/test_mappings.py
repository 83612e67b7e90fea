"""Attention mappings: exactness against the entmax package, gradients, masking, dtypes, compile.

Most tests run the eager solver on small shapes; the compiled path is exercised by a few tests
that share one process-wide compiled kernel per mapping (float32 only, to compile once)."""

from __future__ import annotations

import warnings

import entmax
import pytest
import torch

from sparse_detr.models import compiled_kernel, sparse_solver
from sparse_detr.models.mappings import ALPHA_FLOOR, MAPPINGS, attention_mapping

SPARSE = ("sparsemax", "entmax15", "alpha_entmax")
# The mappings of each row on its own; those over the image grid (TVMax) have tests of their own.
ROW_MAPPINGS = [name for name, kind in MAPPINGS.items() if not kind.needs_grid]
HEADS = 3
# float32 accuracy goals: exact algorithms to 1e-6, alpha-entmax to 1e-5 of bisection in float64
ATOL32 = {"sparsemax": 1e-6, "entmax15": 1e-6, "alpha_entmax": 1e-5}


def build(name, impl="eager", learn=False, alpha=1.5):
    """A mapping in float64-ready form; alpha_entmax fixed at `alpha` or learned per head."""
    if name == "alpha_entmax":
        return attention_mapping(name, impl=impl, alpha=alpha, learn_alpha=learn, num_heads=HEADS if learn else None)
    return attention_mapping(name, impl=impl)


def truth(name, x, alpha=1.5):
    """The entmax package in float64 (bisection with 100 iterations for alpha-entmax)."""
    x = x.double()
    if name == "sparsemax":
        return entmax.sparsemax(x, dim=-1)
    if name == "entmax15":
        return entmax.entmax15(x, dim=-1)
    alpha = alpha if isinstance(alpha, float) else alpha.double().view(1, -1, 1, 1)
    return entmax.entmax_bisect(x, alpha, dim=-1, n_iter=100)


def hard_scores(scale: float, keys: int = 37, seed: int = 0) -> torch.Tensor:
    """[2, HEADS, 6, keys] random scores at `scale` plus the hard rows: ties, a single dominant
    key (support of one), a near-flat row (support = whole row), and repeated maxima."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, HEADS, 6, keys, generator=gen, dtype=torch.float64) * scale
    x[0, 0, 0] = torch.round(x[0, 0, 0] * 2 / scale) / 2 * scale  # many ties
    x[0, 0, 1] = 0.0
    x[0, 0, 1, 3] = 50.0  # one-element support
    x[0, 0, 2] = 1e-4 * torch.randn(keys, generator=gen, dtype=torch.float64)  # whole row
    x[0, 0, 3, :5] = x[0, 0, 3].max()  # tied maxima
    x[1, 1, 0] = 0.0  # exactly flat
    return x


# --- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.01, 0.1, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("impl", ["eager", "reference"])
def test_matches_entmax_float64(impl, name, scale):
    x = hard_scores(scale)
    p = build(name, impl).double()(x)
    torch.testing.assert_close(p, truth(name, x), atol=1e-10 if impl == "eager" else 1e-7, rtol=0)
    if name != "alpha_entmax":
        assert torch.equal(p > 0, truth(name, x) > 0)


@pytest.mark.parametrize("scale", [0.01, 0.1, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("name", SPARSE)
def test_eager_float32_meets_accuracy_goal(name, scale):
    """float32 solver vs float64 truth on the same inputs: 1e-6 / 1e-5 and the same support."""
    x = hard_scores(scale, keys=301).float()
    p = build(name)(x)
    assert p.dtype == torch.float32
    ref = truth(name, x)
    assert (p.double() - ref).abs().max() <= ATOL32[name]
    if name != "alpha_entmax":
        assert torch.equal(p > 0, entmax.sparsemax(x, -1) > 0 if name == "sparsemax" else entmax.entmax15(x, -1) > 0)


@pytest.mark.parametrize("alpha", [1.05, 1.3, 1.75, 1.99, 2.0])
def test_alpha_entmax_any_fixed_alpha(alpha):
    x = hard_scores(1.0)
    torch.testing.assert_close(build("alpha_entmax", alpha=alpha).double()(x), truth("alpha_entmax", x, alpha), atol=1e-9, rtol=0)


def test_alpha_entmax_at_2_and_1p5_equals_sparsemax_and_entmax15():
    x = hard_scores(1.0)
    torch.testing.assert_close(build("alpha_entmax", alpha=2.0).double()(x), build("sparsemax")(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(build("alpha_entmax", alpha=1.5).double()(x), build("entmax15")(x), atol=1e-12, rtol=0)


def test_learned_alpha_per_head_matches_bisection():
    m = build("alpha_entmax", learn=True).double()
    with torch.no_grad():
        m.pre_alpha.copy_(torch.tensor([-2.0, 0.0, 3.0]))
    x = hard_scores(1.0)
    torch.testing.assert_close(m(x), truth("alpha_entmax", x, m.alpha.detach()), atol=1e-9, rtol=0)


def test_single_key_gets_probability_one():
    x = torch.randn(2, HEADS, 4, 1)
    for name in ROW_MAPPINGS:
        assert torch.equal(build(name)(x), torch.ones_like(x))


def solver(name) -> sparse_solver.ThresholdSolver:
    return MAPPINGS[name].solver


def spy_exact_rows(monkeypatch, name) -> list[int]:
    """Record how many rows each call of the exact fallback of `name`'s solver receives."""
    calls = []
    exact_rows = solver(name).exact

    def spy(x, alpha):
        calls.append(x.shape[0])
        return exact_rows(x, alpha)

    monkeypatch.setattr(solver(name), "exact", spy)
    return calls


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_iteration_cap_runs_exact_fallback(name, monkeypatch):
    """With zero Newton steps no row is ever certified, so every row takes the sort fallback."""
    calls = spy_exact_rows(monkeypatch, name)
    x = hard_scores(1.0).float()
    p = solver(name).rows(x, compiled=False, steps=0)
    assert calls == [x[..., 0].numel()]
    ref = entmax.sparsemax(x, -1) if name == "sparsemax" else entmax.entmax15(x, -1)
    torch.testing.assert_close(p, ref, atol=1e-6, rtol=0)
    assert torch.equal(p > 0, ref > 0)


def test_iteration_cap_runs_bisection_fallback_for_alpha(monkeypatch):
    calls = spy_exact_rows(monkeypatch, "alpha_entmax")
    x = hard_scores(1.0)
    alpha = torch.tensor([1.2, 1.5, 1.9], dtype=torch.float64).view(1, -1, 1, 1)
    p = solver("alpha_entmax").rows(x, alpha, compiled=False, steps=0)
    assert calls and calls[0] > 0
    torch.testing.assert_close(p, truth("alpha_entmax", x, alpha), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", SPARSE)
def test_uncertified_rows_continue_in_later_rounds(name, monkeypatch):
    """Two passes per round are too few for near-flat rows; later rounds finish them exactly."""
    calls = spy_exact_rows(monkeypatch, name)
    rounds = []
    kernel = solver(name).kernel
    monkeypatch.setattr(solver(name), "kernel", lambda x, *a: rounds.append(x.shape[0]) or kernel(x, *a))
    monkeypatch.setattr(sparse_solver, "RETRIES", 8)
    x = hard_scores(0.1, keys=200)
    alpha = 1.8 if name == "alpha_entmax" else None
    p = solver(name).rows(x, alpha, compiled=False, steps=2)
    assert len(rounds) > 1 and rounds[1] < rounds[0]  # later rounds see only the unfinished rows
    assert calls == []
    torch.testing.assert_close(p, truth(name, x, 1.8), atol=1e-10, rtol=0)


# --- on the device: no host synchronisation ----------------------------------------------------


def solve_both_ways(name, x, alpha, steps):
    """[(p, dx)] from the host-branching path, then from the on-device path, same inputs."""
    out = []
    for on_device in (False, True):
        x = x.detach().clone().requires_grad_()
        p = solver(name).rows(x, alpha, compiled=False, steps=steps, on_device=on_device)
        (dx,) = torch.autograd.grad(p, x, torch.ones_like(p) + x.detach())
        out.append((p.detach(), dx))
    return out


@pytest.mark.parametrize("case", ["default", "later rounds", "every row to the fallback"])
@pytest.mark.parametrize("name", SPARSE)
def test_on_device_path_equals_host_path(name, case, monkeypatch):
    """Forced on the CPU, choosing rows on the device gives bit for bit the host path's answer,
    also where later rounds and the exact fallback (zero steps: no row certified) are needed."""
    calls = spy_exact_rows(monkeypatch, name)
    monkeypatch.setattr(sparse_solver, "UNCERTIFIED", {})
    steps = {"default": None, "later rounds": 2, "every row to the fallback": 0}[case]
    x = hard_scores(0.1 if case == "later rounds" else 1.0, keys=200).float()
    if case == "every row to the fallback":
        monkeypatch.setattr(sparse_solver, "ON_DEVICE_MIN_ROWS", x[..., 0].numel())
    alpha = torch.tensor([1.2, 1.5, 1.9]).view(1, -1, 1, 1) if name == "alpha_entmax" else None
    (p_host, dx_host), (p_dev, dx_dev) = solve_both_ways(name, x, alpha, steps)
    assert torch.equal(p_dev, p_host) and torch.equal(dx_dev, dx_host)
    if case == "every row to the fallback":
        assert calls[-1] == x[..., 0].numel()  # the fallback did run, on every row
    assert sparse_solver.check_uncertified() == 0


def test_on_device_overflow_is_counted_and_widens_the_fallback(monkeypatch):
    """More uncertified rows than the on-device capacity: counted on the device, reported once
    by check_uncertified (with a warning), and the next steps give the fallback more rows."""
    monkeypatch.setattr(sparse_solver, "UNCERTIFIED", {})
    monkeypatch.setattr(sparse_solver, "ON_DEVICE_SHARE", 32)
    x = hard_scores(1.0).float().reshape(-1, 37)  # 36 rows, capacity 16
    solver("sparsemax").solve(x, None, compiled=False, steps=0, on_device=True)
    with pytest.warns(RuntimeWarning, match="20 attention rows"):
        assert sparse_solver.check_uncertified() == 20
    assert sparse_solver.ON_DEVICE_SHARE == 16 and sparse_solver.check_uncertified() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): checks the device path")
@pytest.mark.parametrize("impl", ["eager", "fast"])
@pytest.mark.parametrize("name", ROW_MAPPINGS)
def test_cuda_forward_backward_never_synchronises(name, impl):
    m = build(name, impl, learn=name == "alpha_entmax").cuda()
    x = torch.randn(2, HEADS, 50, 300, device="cuda", requires_grad=True)
    mask = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    mask[1, 250:] = True
    g = torch.randn_like(x)
    m(x, key_padding_mask=mask).backward(g)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for key_padding_mask in (None, mask):
            m(x, key_padding_mask=key_padding_mask).backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROW_MAPPINGS)
def test_gradcheck_scores(name):
    x = torch.randn(2, HEADS, 3, 6, dtype=torch.float64, requires_grad=True)
    m = build(name).double()
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8])
def test_gradcheck_fixed_alpha(alpha):
    x = torch.randn(2, HEADS, 3, 6, dtype=torch.float64, requires_grad=True)
    m = build("alpha_entmax", alpha=alpha).double()
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))


def test_gradcheck_learned_alpha():
    """Gradient with respect to the scores and to every head's pre_alpha (closed form)."""
    m = build("alpha_entmax", learn=True).double()
    with torch.no_grad():
        m.pre_alpha.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    x = torch.randn(2, HEADS, 3, 6, dtype=torch.float64, requires_grad=True)
    pre = m.pre_alpha.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, pre: torch.func.functional_call(m, {"pre_alpha": pre}, (x,)), (x, pre))


def test_learned_alpha_gets_a_gradient():
    m = build("alpha_entmax", learn=True)
    x = torch.randn(2, HEADS, 5, 9)
    (m(x) * torch.randn(2, HEADS, 5, 9)).sum().backward()
    assert m.pre_alpha.grad is not None
    assert torch.isfinite(m.pre_alpha.grad).all() and (m.pre_alpha.grad != 0).all()


def test_alpha_stays_inside_bounds_for_extreme_pre_alpha():
    m = build("alpha_entmax", learn=True)
    with torch.no_grad():
        m.pre_alpha.copy_(torch.tensor([-1e4, 0.0, 1e4]))
    assert (m.alpha > 1).all() and (m.alpha <= 2).all()
    assert m.alpha[0] >= ALPHA_FLOOR
    x = torch.randn(2, HEADS, 4, 7, requires_grad=True)
    p = m(x)
    p.sum().backward()
    assert torch.isfinite(p).all() and torch.isfinite(x.grad).all() and torch.isfinite(m.pre_alpha.grad).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, HEADS, 4))


def test_learned_alpha_initialised_to_given_alpha():
    m = attention_mapping("alpha_entmax", alpha=1.3, learn_alpha=True, num_heads=4)
    torch.testing.assert_close(m.alpha.detach(), torch.full((4,), 1.3))
    assert dict(m.named_parameters()).keys() == {"pre_alpha"}


# --- masking -----------------------------------------------------------------------------------


IMPLS_FOR_MASK = [("softmax", "eager")] + [(n, i) for n in SPARSE for i in ("eager", "reference")]


@pytest.mark.parametrize("name,impl", IMPLS_FOR_MASK)
def test_masking_equals_truncation(name, impl):
    x = hard_scores(1.0, keys=11)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 7:] = True
    mask[1, ::3] = True
    m = build(name, impl).double()
    p = m(x, key_padding_mask=mask)
    for b in range(2):
        keep = ~mask[b]
        assert torch.equal(p[b][..., ~keep], torch.zeros_like(p[b][..., ~keep]))
        torch.testing.assert_close(p[b][..., keep], m(x[b : b + 1][..., keep])[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name,impl", IMPLS_FOR_MASK)
def test_fully_masked_rows_are_zero_with_zero_gradient(name, impl):
    x = torch.randn(2, HEADS, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1] = True  # second image: every key padded
    m = build(name, impl, learn=name == "alpha_entmax").double()
    p = m(x, key_padding_mask=mask)
    (p * torch.randn_like(p)).sum().backward()
    assert torch.equal(p[1], torch.zeros_like(p[1]))
    torch.testing.assert_close(p[0].sum(-1), torch.ones(HEADS, 4, dtype=torch.float64))
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    for param in m.parameters():
        assert torch.isfinite(param.grad).all()


@pytest.mark.parametrize("name", SPARSE)
def test_solver_maps_minus_inf_rows_to_zero(name):
    """Scores that are -inf already (e.g. an additive attention mask) are handled by the solver."""
    x = torch.randn(1, HEADS, 3, 5, dtype=torch.float64)
    x[..., 1] = float("-inf")
    x[0, 0, 2] = float("-inf")
    p = build(name).double()(x)
    assert torch.equal(p[0, 0, 2], torch.zeros(5, dtype=torch.float64))
    assert (p[..., 1] == 0).all()
    torch.testing.assert_close(p[0, 1:].sum(-1), torch.ones(HEADS - 1, 3, dtype=torch.float64))


# --- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "fast"])
@pytest.mark.parametrize("name", ROW_MAPPINGS)
def test_half_precision_computes_in_float32(name, impl):
    """bf16 scores (as under autocast) are mapped in float32 and the result cast back."""
    q, k = torch.randn(2, HEADS, 5, 16) / 4, torch.randn(2, HEADS, 40, 16)  # q scaled by 1/sqrt(d)
    m = build(name, impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = q @ k.transpose(-2, -1)
        p = m(scores)
    assert scores.dtype == p.dtype == torch.bfloat16
    assert torch.equal(p, m(scores.float()).to(torch.bfloat16))  # float32 inside, exactly
    torch.testing.assert_close(p.float(), m(q @ k.transpose(-2, -1)), atol=2e-2, rtol=0)
    # bf16 stores 8 significant bits: a probability >= 0.5 is rounded by up to 2^-9 ~ 2e-3
    torch.testing.assert_close(p.float().sum(-1), torch.ones(2, HEADS, 5), atol=1e-2, rtol=0)
    assert (m(scores.float()).sum(-1) - 1).abs().max() <= 1e-5


def test_half_input_float16():
    x = torch.randn(2, HEADS, 4, 30, dtype=torch.float16)
    p = build("entmax15")(x)
    assert p.dtype == torch.float16
    torch.testing.assert_close(p.float(), build("entmax15")(x.float()), atol=1e-3, rtol=0)


# --- modules and registry ----------------------------------------------------------------------


def test_softmax_and_fixed_alpha_have_no_state():
    for m in (attention_mapping("softmax"), attention_mapping("alpha_entmax", alpha=1.7)):
        assert list(m.parameters()) == [] and m.state_dict() == {}
    assert attention_mapping("alpha_entmax", alpha=1.7).alpha.item() == pytest.approx(1.7)


def test_softmax_equals_torch_softmax_with_minus_inf_mask():
    x = torch.randn(2, HEADS, 4, 9)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:] = True
    expected = torch.softmax(x.masked_fill(mask[:, None, None, :], float("-inf")), -1)
    assert torch.equal(attention_mapping("softmax")(x, key_padding_mask=mask), expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "sparsemaxx"}, "sparsemaxx.*softmax, sparsemax, entmax15, alpha_entmax"),
        ({"name": "sparsemax", "impl": "cuda"}, "cuda.*fast, eager, reference"),
        ({"name": "alpha_entmax", "alpha": 1.0}, r"\(1, 2\]"),
        ({"name": "alpha_entmax", "alpha": 2.5}, r"\(1, 2\]"),
        ({"name": "alpha_entmax", "learn_alpha": True}, "num_heads"),
        ({"name": "alpha_entmax", "learn_alpha": True, "num_heads": 8, "alpha": 2.0}, "learned alpha"),
    ],
)
def test_bad_arguments_name_the_valid_choices(kwargs, match):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):
        attention_mapping(kwargs.pop("name"), **kwargs)


# --- compiled path (one compiled kernel per mapping, shared by these tests) --------------------


@pytest.mark.parametrize("name", SPARSE)
def test_compiled_equals_eager_equals_reference_without_recompiling(name):
    if not compiled_kernel.compile_enabled():
        pytest.skip("compilation disabled (SPARSE_DETR_COMPILE=0 or unavailable)")
    fast, eager = build(name, "fast", learn=name == "alpha_entmax"), build(name, "eager", learn=name == "alpha_entmax")
    frames = torch._dynamo.utils.counters["stats"]
    for i, (queries, keys) in enumerate([(7, 33), (5, 20), (9, 9), (3, 50)]):
        x = (hard_scores(1.0, keys=keys, seed=i)[:, :, :1].expand(2, HEADS, queries, keys)
             + torch.randn(2, HEADS, queries, keys, dtype=torch.float64) * 0.3).float()
        x.requires_grad_()
        g = torch.randn_like(x)
        p_fast = fast(x)
        (dx_fast,) = torch.autograd.grad(p_fast, x, g)
        p_eager = eager(x)
        (dx_eager,) = torch.autograd.grad(p_eager, x, g)
        torch.testing.assert_close(p_fast, p_eager, atol=1e-6, rtol=0)
        torch.testing.assert_close(dx_fast, dx_eager, atol=1e-5, rtol=1e-5)
        assert (p_fast.double() - truth(name, x.detach(), eager.alpha.detach() if name == "alpha_entmax" else 1.5)).abs().max() <= ATOL32[name]
        if i == 0:
            compiled_after_first = frames["unique_graphs"]
    assert frames["unique_graphs"] == compiled_after_first, "a new size recompiled the kernel"


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("simulated: no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiled_kernel, "_COMPILED", {})
    monkeypatch.setattr(compiled_kernel, "_COMPILE_FAILED", False)
    monkeypatch.delenv("SPARSE_DETR_COMPILE", raising=False)
    x = torch.randn(2, HEADS, 4, 10, requires_grad=True)
    m = build("entmax15", "fast")
    with pytest.warns(RuntimeWarning, match="using the eager solver"):
        p = m(x)
    assert not compiled_kernel.compile_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.sum().backward()
        assert torch.equal(m(x), build("entmax15", "eager")(x))


def test_env_var_forces_eager(monkeypatch):
    def no_compile(fn, **kwargs):
        raise AssertionError("torch.compile must not be called with SPARSE_DETR_COMPILE=0")

    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setattr(compiled_kernel, "_COMPILED", {})
    monkeypatch.setenv("SPARSE_DETR_COMPILE", "0")
    x = torch.randn(2, HEADS, 4, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(build("sparsemax", "fast")(x), build("sparsemax", "eager")(x))
