"""gradops.weighting's solver backends against the torch reference loops: the C++ CPU loops
(csrc/weighting_cpu.cpp) and, under TRITON_INTERPRET=1, the Triton programs of
gradops/weighting/_triton_solvers.py (the GPU path; on a GPU, tests/ops/test_gpu.py runs them for
real).

The C++ loops run the torch loops' algorithms in double precision; the Triton Nash-MTL loop runs
in G's dtype, the MGDA / CAGrad active-set solver in float64 everywhere. Nash-MTL (Newton: no
discrete choices) gives the same iterates to rounding. The active-set solver chooses tasks by
argmin / argmax of a gradient, so at a rounding-level tie the backends may take other (equally
valid) corrals to the same optimum: MGDA / CAGrad are compared where a comparison is exact: the
first step (before any tie), the solution at a tight tolerance (unique there), and at the default
tolerance through the solver's own certificate (both within ``residual`` of the optimum), with
the same ``converged``. CAGrad's own comparisons are in tests/weighting/test_cagrad.py; the cases
and the comparison helpers in tests/weighting/solver_helpers.py.
"""
from __future__ import annotations

import math

import pytest
import torch

import gradops
from gradops import _backend
from gradops import weighting as W
from gradops.weighting import _solvers as WS

from backend_lists import cpu_backends
from solver_helpers import (CASES, DTYPES, SOLVER_BACKENDS, UNIQUE, _bn, _both, _gram,
                            _its_close, _losses, _rel_err, _same_status_types)

needs_cpp = pytest.mark.skipif("cpp" not in cpu_backends(),
                               reason="GRADOPS_NO_EXT=1: the C++ extension was not built")


@pytest.fixture(params=SOLVER_BACKENDS)
def backend(request):
    return request.param


MGDA_NORMS = ("none", "l2", "loss", "loss+")


def _mgda_inverse_scales(J: torch.Tensor, normalization: str) -> torch.Tensor:
    """1 / s_i of MGDA's normalisation (0 where s_i = 0, as gradops.weighting.mgda)."""
    n = J.norm(dim=1)
    losses = _losses(J.shape[0])
    s = {"none": torch.ones_like(n), "l2": n, "loss": losses, "loss+": losses * n}[normalization]
    return torch.where(s != 0, 1.0 / torch.where(s != 0, s, 1.0), 0.0)


# ------------------------------------------------------------------------------------------ #
# dispatch
# ------------------------------------------------------------------------------------------ #

class _Spy:
    """Stands in for gradops._C in gradops.weighting and counts the solver calls."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        fn = getattr(_backend._C, name)

        def wrapped(*a, **k):
            self.calls.append(name)
            return fn(*a, **k)
        return wrapped


@pytest.fixture
def spy(monkeypatch):
    s = _Spy()
    monkeypatch.setattr(WS, "_C", s)
    return s


def _call_all(G):
    W.mgda(G)
    W.mgda(G, "l2")
    W.cagrad(G)
    W.cagrad(G, c=0.0)          # closed form: no solve
    W.nashmtl(G)


@needs_cpp
def test_default_backend_on_cpu_is_cpp(spy, monkeypatch):
    assert _backend.ext_available(), _backend.EXT_ERROR
    cpu = gradops.info()["ops"]["weighting_solvers"]["cpu"]
    interpreted = "triton" in cpu_backends()
    assert cpu["default"] == "cpp"
    assert cpu["live"] == (["triton"] if interpreted else []) + ["cpp", "torch"]
    assert "weighting_solvers" in gradops.format_info()
    G = _gram(CASES["random_T5"], torch.float32)
    assert WS._solver_backend(G) == "cpp"
    _call_all(G)
    # nashmtl: its Newton loop, then MGDA's min-norm point (the no-solution certificate)
    assert spy.calls == ["simplex_qp_cpu", "simplex_qp_cpu", "simplex_qp_cpu",
                         "nash_newton_cpu", "simplex_qp_cpu"]
    spy.calls.clear()
    with gradops.use_backend("torch"):
        assert WS._solver_backend(G) == "torch"
        _call_all(G)
    monkeypatch.setenv("GRADOPS_BACKEND", "torch")
    _call_all(G)
    assert spy.calls == []
    with gradops.use_backend("cpp"):          # forcing cpp beats the environment
        W.nashmtl(G)
    assert spy.calls == ["nash_newton_cpu", "simplex_qp_cpu"]


def test_forced_triton_runs_the_triton_solvers_or_says_why(monkeypatch):
    """Forcing Triton sends the solvers to their Triton programs (on CPU tensors only under the
    interpreter: elsewhere a clear error, no silent fallback); a forced backend the solvers do
    not have (``cuda``) leaves them their automatic choice; T > 64 cannot use Triton."""
    G = _gram(CASES["random_T3"], torch.float32)
    calls = []
    real = WS._triton_solvers.simplex_qp_triton
    monkeypatch.setattr(WS._triton_solvers, "simplex_qp_triton",
                        lambda *a: calls.append(1) or real(*a))
    with gradops.use_backend("triton"):
        if "triton" in cpu_backends():
            assert WS._solver_backend(G) == "triton"
            W.mgda(G)
            assert calls == [1]
            with pytest.raises(RuntimeError, match="T <= 64"):
                W.mgda(_gram(torch.randn(65, 70, dtype=torch.float64), torch.float32))
        else:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                W.mgda(G)
    with gradops.use_backend("cuda"):
        assert WS._solver_backend(G) == ("cpp" if "cpp" in cpu_backends() else "torch")


@pytest.mark.skipif("triton" not in cpu_backends(), reason="Triton is not interpreted here")
def test_triton_grad_keeps_the_torch_loop():
    Gr = _gram(CASES["random_T5"], torch.float32).requires_grad_()
    with gradops.use_backend("triton"), pytest.raises(RuntimeError, match="differentiable"):
        W.nashmtl(Gr)


@needs_cpp
def test_compile_and_grad_keep_the_torch_loop(spy):
    G = _gram(CASES["random_T5"], torch.float32)
    torch._dynamo.reset()
    f = torch.compile(lambda G: (W.mgda(G, max_iter=5), W.cagrad(G, max_iter=5),
                                 W.nashmtl(G, max_iter=3)), fullgraph=True, backend="eager")
    out = f(G)
    assert spy.calls == []
    with gradops.use_backend("torch"):
        ref = (W.mgda(G, max_iter=5), W.cagrad(G, max_iter=5), W.nashmtl(G, max_iter=3))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    # a G that needs a gradient keeps the differentiable torch loop ...
    Gr = G.clone().requires_grad_()
    w = W.nashmtl(Gr, max_iter=3)
    assert w.requires_grad and spy.calls == []
    with torch.no_grad():                     # ... unless grad mode is off
        W.nashmtl(Gr)
    assert spy.calls == ["nash_newton_cpu", "simplex_qp_cpu"]   # Newton, then the certificate
    with gradops.use_backend("cpp"), pytest.raises(RuntimeError, match="differentiable"):
        W.mgda(Gr)


@needs_cpp
def test_binding_checks():
    C = _backend._C
    G = _gram(CASES["random_T3"], torch.float32)
    s = G.diagonal().max()
    with pytest.raises(RuntimeError, match="float32 or float64"):
        C.simplex_qp_cpu(G.to(torch.int32), None, s, None, None, 5, 1e-5, 1e-38)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        C.nash_newton_cpu(torch.zeros(2, 3), 5, 1e-5, 1e-38, 1e-6)
    with pytest.raises(RuntimeError, match="b, k and delta2 together"):
        C.simplex_qp_cpu(G, G.sum(1), s, None, None, 5, 1e-5, 1e-38)
    with pytest.raises(RuntimeError, match="G's dtype"):
        C.simplex_qp_cpu(G, None, s.double(), None, None, 5, 1e-5, 1e-38)
    with pytest.raises(RuntimeError, match="max_iter >= 0"):
        C.nash_newton_cpu(G, -1, 1e-5, 1e-38, 1e-6)


# ------------------------------------------------------------------------------------------ #
# Nash-MTL: the same iterates
# ------------------------------------------------------------------------------------------ #

@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_nashmtl_matches_torch(name, dtype, max_norm, backend):
    G = _gram(CASES[name], dtype)
    (w_t, st_t), (w_c, st_c) = _both(W.nashmtl, G, max_norm=max_norm, backend=backend)
    assert w_c.dtype == w_t.dtype == dtype
    _same_status_types(st_t, st_c)
    assert bool(st_t.converged) and bool(st_c.converged), (st_t, st_c)
    err = _rel_err(w_c, w_t)
    assert err <= (1e-10 if dtype == torch.float64 else 2e-5), err
    d_its = abs(int(st_t.iterations) - int(st_c.iterations))
    assert d_its <= (0 if dtype == torch.float64 else 1), (st_t, st_c)
    assert float(st_c.residual) <= 1e-5
    if dtype == torch.float64:
        assert abs(float(st_c.residual) - float(st_t.residual)) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
def test_nashmtl_undefined_matches_torch(dtype, backend):
    """0 in the hull (T > P): no solution; both loops run the whole budget and say so."""
    J = torch.randn(40, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (w_t, st_t), (w_c, st_c) = _both(W.nashmtl, _gram(J, dtype), backend=backend)
    assert not bool(st_t.converged) and not bool(st_c.converged)
    assert int(st_t.iterations) == int(st_c.iterations) == 20
    assert bool(torch.isfinite(w_c).all())
    Gd = J @ J.T
    assert float(w_c.double() @ Gd @ w_c.double()) <= 1.0 + 1e-4   # ||d|| <= max_norm


@pytest.mark.parametrize("dtype", DTYPES)
def test_nashmtl_budgets_match_torch(dtype, backend):
    G = _gram(CASES["conflicting_T8"], dtype)
    for max_iter in (0, 1, 2, 3):
        (w_t, st_t), (w_c, st_c) = _both(W.nashmtl, G, max_iter=max_iter, tol=1e-12,
                                         backend=backend)
        assert int(st_t.iterations) == int(st_c.iterations) == max_iter
        assert not bool(st_c.converged) and not bool(st_t.converged)
        assert _rel_err(w_c, w_t) <= (1e-12 if dtype == torch.float64 else 1e-5)


# ------------------------------------------------------------------------------------------ #
# Frank-Wolfe (MGDA, CAGrad)
# ------------------------------------------------------------------------------------------ #

@pytest.mark.parametrize("backend,name", _bn(list(CASES)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_fw_first_steps_match_torch(name, dtype, backend):
    """Before any rounding-level tie (max_iter 0 and 1) the iterates are the same."""
    G = _gram(CASES[name], dtype)
    T = G.shape[0]
    losses = _losses(T).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    solver_tol = 1e-13 if dtype == torch.float64 else 1e-6   # above rounding: exact starts and
    for max_iter in (0, 1):                                   # steps (T <= 2) count in both
        runs = [(W.mgda, dict(normalization=n, losses=losses)) for n in MGDA_NORMS]
        runs += [(W.cagrad, dict(c=c)) for c in (0.4, 2.0)]
        for fn, kw in runs:
            (w_t, st_t), (w_c, st_c) = _both(fn, G, max_iter=max_iter, tol=solver_tol, **kw,
                                             backend=backend)
            assert _rel_err(w_c, w_t) <= tol, (fn.__name__, kw, max_iter)
            assert int(st_t.iterations) == int(st_c.iterations) <= max_iter
            assert bool(st_t.converged) == bool(st_c.converged)
            assert abs(float(st_c.residual) - float(st_t.residual)) <= \
                tol * max(1.0, abs(float(st_t.residual)))


@pytest.mark.parametrize("backend,name", _bn(list(CASES)))
@pytest.mark.parametrize("normalization", MGDA_NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mgda_matches_torch(name, normalization, dtype, backend):
    """Default budget and tolerance: both converge, and their updates are within the solver's
    certificate ``||d - d*||^2 <= residual * max_i Gn_ii`` of the same optimum."""
    J = CASES[name]
    T = J.shape[0]
    G = _gram(J, dtype)
    losses = _losses(T).to(dtype)
    (w_t, st_t), (w_c, st_c) = _both(W.mgda, G, normalization, losses, backend=backend)
    assert w_c.dtype == w_t.dtype == dtype
    _same_status_types(st_t, st_c)
    assert bool(st_t.converged) and bool(st_c.converged), (st_t, st_c)
    assert _its_close(int(st_t.iterations), int(st_c.iterations)), (st_t, st_c)
    assert bool((w_c >= 0).all())
    inv = _mgda_inverse_scales(J, normalization)
    Gd = G.double()                           # the problem both solved
    gn_max = float((Gd.diagonal() * inv * inv).max())
    noise = 1e-6 if dtype == torch.float32 else 1e-13   # rounding of a residual near 0
    bound = sum(math.sqrt(max(float(st.residual), 0.0) + noise) for st in (st_t, st_c))
    dw = w_c.double() - w_t.double()
    dist = math.sqrt(max(float(dw @ Gd @ dw), 0.0))
    assert dist <= bound * math.sqrt(gn_max), (dist, bound * math.sqrt(gn_max))


TIGHT_FW = {torch.float64: dict(max_iter=3000, tol=1e-12),
            torch.float32: dict(max_iter=600, tol=1e-9)}


# fp32 only up to T = 13: beyond, the fp32 torch loop runs its whole budget (slow); Triton (under
# the interpreter, ~1 ms per op) on a few cases only: thousands of iterations each
_TIGHT_CASES = [(n, dt) for dt in DTYPES for n in UNIQUE
                if dt == torch.float64 or CASES[n].shape[0] <= 13]
_TIGHT_TRITON = [("random_T3", torch.float32), ("random_T3", torch.float64),
                 ("conflicting_T8", torch.float64)]   # T = 40, 64: tests/ops/test_gpu.py, GPU


@pytest.mark.parametrize("backend,name,dtype",
                         [("cpp", n, dt) for n, dt in _TIGHT_CASES if "cpp" in SOLVER_BACKENDS]
                         + [("triton", n, dt) for n, dt in _TIGHT_TRITON
                            if "triton" in SOLVER_BACKENDS])
def test_fw_tight_weights_match_torch(name, dtype, backend):
    """Solved tightly, the (unique) weights agree: to 1e-8 of max |w| in fp64 (both loops
    converge to tol = 1e-14), to 1e-4 in fp32 (the torch fp32 loop stalls at its rounding level,
    ~1e-7 in the gap, the C++ loop goes below it)."""
    G = _gram(CASES[name], dtype)
    T = G.shape[0]
    losses = _losses(T).to(dtype)
    runs = [(W.mgda, dict(normalization=n, losses=losses)) for n in MGDA_NORMS]
    runs += [(W.cagrad, dict(c=c, rescale=r)) for c, r in ((0.4, 1), (2.0, 0))]
    rtol = 1e-8 if dtype == torch.float64 else 1e-4
    for fn, kw in runs:
        (w_t, st_t), (w_c, st_c) = _both(fn, G, **kw, **TIGHT_FW[dtype], backend=backend)
        assert _rel_err(w_c, w_t) <= rtol, (fn.__name__, kw, _rel_err(w_c, w_t))
        if dtype == torch.float64:
            assert bool(st_c.converged) and bool(st_t.converged), (fn.__name__, kw, st_t, st_c)
        else:                                 # below the fp32 loop's rounding level
            assert float(st_c.residual) < 1e-7, (fn.__name__, kw, st_c)


@pytest.mark.parametrize("name", ["duplicate_rows", "collinear_rows", "rank3_of_7", "zero_row"])
def test_mgda_rank_deficient_tight_update_matches_torch(name, backend):
    """w* is not unique when the rows are affinely dependent, the update d* = J^T w* is."""
    J = CASES[name]
    (w_t, st_t), (w_c, st_c) = _both(W.mgda, _gram(J, torch.float64), **TIGHT_FW[torch.float64],
                                     backend=backend)
    assert bool(st_t.converged) and bool(st_c.converged)
    d_t, d_c = w_t @ J, w_c @ J
    assert float((d_c - d_t).norm()) <= 1e-6 * float(J.norm(dim=1).max())
    if name == "zero_row":                    # the min-norm point is the zero gradient itself
        assert float(w_c[2]) == pytest.approx(1.0) and float(d_c.norm()) <= 1e-6


# ------------------------------------------------------------------------------------------ #
# dtypes, non-finite input
# ------------------------------------------------------------------------------------------ #

@pytest.mark.parametrize("method", sorted(W.ITERATIVE))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_match_torch(method, dtype, backend):
    G = _gram(CASES["random_T5"], dtype)
    (w_t, st_t), (w_c, st_c) = _both(W.get(method), G, backend=backend)
    assert w_c.dtype == w_t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert w_c.shape == w_t.shape == (5,) and w_c.device == G.device
    _same_status_types(st_t, st_c)
    assert bool(st_c.converged) == bool(st_t.converged)


def _broken_grams(dtype):
    G = _gram(CASES["random_T5"], dtype)
    off = G.clone()
    off[1, 3] = off[3, 1] = math.nan
    diag = G.clone()
    diag[2, 2] = math.nan
    inf = G.clone()
    inf[0, 4] = inf[4, 0] = math.inf
    return {"nan_offdiag": off, "nan_diag": diag, "inf": inf,
            "all_nan": torch.full_like(G, math.nan)}


NONFINITE_RUNS = [("mgda", dict(normalization=n)) for n in MGDA_NORMS] + \
    [("cagrad", dict(c=0.4)), ("cagrad", dict(c=2.0, rescale=0)), ("nashmtl", {}),
     ("nashmtl", dict(max_norm=0.0))]


@pytest.mark.parametrize("method,kw", NONFINITE_RUNS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_gram_matches_torch(method, kw, dtype, backend):
    """NaN / Inf in G: no crash, no hang, non-finite weights, not converged, the torch loop's
    iteration count (the whole budget, unless Nash-MTL's solve never sees the broken entries)."""
    if method != "nashmtl":
        kw = dict(kw, max_iter=25)            # the torch loop and the interpreter are slow; the
                                              # budget is the point
    for gname, G in _broken_grams(dtype).items():
        kw2 = dict(kw, losses=_losses(5).to(dtype)) if method == "mgda" else kw
        (w_t, st_t), (w_c, st_c) = _both(W.get(method), G, **kw2, backend=backend)
        assert not bool(torch.isfinite(w_c).all()), (gname, w_c)
        assert not bool(st_c.converged) and not bool(st_t.converged), gname
        assert int(st_c.iterations) == int(st_t.iterations), (gname, st_t, st_c)
        assert math.isnan(float(st_c.residual)) == math.isnan(float(st_t.residual)), gname


def test_mgda_nan_loss_matches_torch(backend):
    """A NaN loss with a finite G (the poison of G does not fire): still non-finite weights."""
    G = _gram(CASES["random_T5"], torch.float32)
    losses = _losses(5).float()
    losses[3] = math.nan
    budget = 25                                  # the torch loop and the interpreter are slow
    for normalization in ("loss", "loss+"):
        (w_t, st_t), (w_c, st_c) = _both(W.mgda, G, normalization, losses, max_iter=budget,
                                         backend=backend)
        assert not bool(torch.isfinite(w_c).all()) and not bool(st_c.converged)
        assert int(st_c.iterations) == int(st_t.iterations) == budget
        assert math.isnan(float(st_c.residual))


@needs_cpp
def test_kernels_terminate_on_nan():
    """Straight into the kernels: an all-NaN G runs the budget and reports NaN, every index the
    loop used stayed in range (no crash), for the quadratic and the CAGrad line search."""
    C = _backend._C
    for dtype in DTYPES:
        G = torch.full((7, 7), math.nan, dtype=dtype)
        one = torch.ones((), dtype=dtype)
        for b, k, d2 in ((None, None, None), (G.sum(1), one, one)):
            w, conv, its, res = C.simplex_qp_cpu(G, b, one, k, d2, 1000, 1e-5, 1e-38)
            assert not bool(conv) and int(its) == 1000 and math.isnan(float(res))
            assert w.shape == (7,) and w.dtype == dtype
        a, conv, its, res = C.nash_newton_cpu(G, 50, 1e-5, 1e-38, 1e-6)
        assert not bool(conv) and int(its) == 50 and math.isnan(float(res))
