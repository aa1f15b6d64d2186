"""CAGrad (Liu et al., NeurIPS 2021), ``gradops.weighting.cagrad``: the update against SLSQP on
the paper's dual (tests/method_references.py) on random and degenerate Jacobians, ``c = 0`` as
the mean, the reported failures (0 in the hull, the primal optimum) pinned, the C++ and Triton
solvers against the torch loop, the TorchJD 0.18 cross-check.

CAGrad also runs in the tests parametrized over every method: tests/weighting/test_common.py,
test_geometries.py and test_solvers.py (shared cases), tests/ops/test_properties.py,
test_values.py and test_float64.py, tests/optim/test_mtl_optimizer.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradops
from gradops import weighting as W
from gradops.weighting import _common as WC, _solvers as WS

import method_references as R
from _asserts import assert_non_conflicting
from backend_lists import cpu_backends
from geometries import NC_RTOL
from solver_helpers import CASES, DTYPES, _bn, _both, _gram, _its_close, _same_status_types
from weighting_helpers import DEGENERATE, TIGHT, TS, assert_update_close, gram, make_jac, update


# ----------------------------------------------------------------------------------------- #
# against the vector-form references, random Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("c,rescale", [(0.4, 1), (0.5, 0), (0.2, 2), (0.0, 1)])
def test_cagrad_matches_slsqp(T, c, rescale, solver_backend):
    J = make_jac(T)
    w, st = W.cagrad(gram(J), c, rescale, **TIGHT["cagrad"], return_status=True)
    assert bool(st.converged)
    ref = R.cagrad_reference(J, c, rescale, smooth=1e-6)   # gradops' fp64 default
    assert_update_close(update(w, J), ref, J, 1e-6, "fp64")
    w32, st32 = W.cagrad(gram(J, torch.float32), c, rescale, return_status=True)
    assert bool(st32.converged)
    ref32 = R.cagrad_reference(J, c, rescale, smooth=math.sqrt(np.finfo(np.float32).eps))
    assert_update_close(update(w32, J), ref32, J, 2e-3, "fp32 defaults")


# ----------------------------------------------------------------------------------------- #
# degenerate Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", list(DEGENERATE))
def test_cagrad_degenerate(name, solver_backend):
    """Where g_w vanishes at the optimum (zero row, opposite pair, all zero) the unsmoothed
    problem is not differentiable; compare at a moderate smoothing (1e-3, both sides), and check
    that the default smoothing keeps d inside CAGrad's ball with finite weights."""
    J = DEGENERATE[name]
    c = 0.4
    g0 = J.mean(0).numpy()
    ref = R.cagrad_reference(J, c, smooth=1e-3)
    for dtype, tight in ((torch.float64, True), (torch.float32, False)):
        kw = TIGHT["cagrad"] if tight else {}
        w, st = W.cagrad(gram(J, dtype), c, smooth=1e-3, **kw, return_status=True)
        assert_update_close(update(w, J), ref, J, 1e-6 if tight else 1e-3, f"{name} {dtype}")
        if tight:
            assert bool(st.converged)
        w = W.cagrad(gram(J, dtype), c, **kw)
        d = update(w, J)
        # always inside CAGrad's ball: ||d (1 + c^2) - g0|| <= c ||g0||
        assert np.linalg.norm(d * (1 + c * c) - g0) <= c * np.linalg.norm(g0) * (1 + 1e-5) + 1e-12


# ----------------------------------------------------------------------------------------- #
# permutation equivariance and scaling
# ----------------------------------------------------------------------------------------- #

def test_cagrad_c0_is_mean():
    G = gram(make_jac(5))
    torch.testing.assert_close(W.cagrad(G, c=0.0, rescale=0), torch.full((5,), 0.2,
                                                                        dtype=torch.float64))


# ----------------------------------------------------------------------------------------- #
# the reported CAGrad failures, reproduced and pinned (tests/weighting/test_geometries.py has
# MGDA's)
# ----------------------------------------------------------------------------------------- #

ISSUE27_BACKENDS = [b for b in cpu_backends() if b in ("torch", "cpp", "triton")]


def _cagrad_primal(J: torch.Tensor, c: float) -> float:
    """``max_d min_i g_i . d`` s.t. ``||d - g0|| <= c ||g0||`` (CAGrad's primal, their Eq. 3), an
    independent float64 solve: scipy's SLSQP on ``(d, t)``, maximise ``t`` s.t. ``J d >= t``."""
    so = pytest.importorskip("scipy.optimize")
    import numpy as np
    A = J.double().numpy()
    T, P = A.shape
    g0 = A.mean(0)
    R = c * float(np.linalg.norm(g0))
    x0 = np.concatenate([g0, [float((A @ g0).min())]])
    cons = [{"type": "ineq", "fun": lambda x: A @ x[:P] - x[P],
             "jac": lambda x: np.hstack([A, -np.ones((T, 1))])},
            {"type": "ineq", "fun": lambda x: R * R - float(((x[:P] - g0) ** 2).sum()),
             "jac": lambda x: np.concatenate([-2 * (x[:P] - g0), [0.0]])}]
    r = so.minimize(lambda x: -x[P], x0, jac=lambda x: np.concatenate([np.zeros(P), [-1.0]]),
                    constraints=cons, method="SLSQP", options=dict(maxiter=2000, ftol=1e-13))
    assert r.status in (0, 8), r.message      # 8: the line search stalled at rounding level
    return float(-r.fun)


@pytest.mark.parametrize("backend", ISSUE27_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_issue27_cagrad_zero_in_hull_is_non_conflicting(backend, dtype):
    """Case 2: ``c = 2``, 0 in the hull: ``J d`` was ``[0.448, 0.444, -0.008, -0.197]``,
    unconverged; the optimal value is 0 (``d = 0`` is feasible), every maximiser is
    non-conflicting, and so is this one within the smoothing's bound."""
    J = torch.randn(4, 3, generator=torch.Generator().manual_seed(181))
    X = J.to(dtype)
    with gradops.use_backend(backend):
        w, st = W.cagrad(X @ X.T, c=2.0, rescale=0, return_status=True)
    assert bool(st.converged), st
    d = w.double() @ J.double()
    smooth = max(math.sqrt(torch.finfo(dtype).eps), 1e-6)
    assert_non_conflicting(J, d, 2 * 2.0 * smooth + NC_RTOL[dtype], "seed 181")
    assert abs(_cagrad_primal(J, 2.0)) <= 1e-9                # the optimum is 0 here
    g0 = J.double().mean(0)
    assert float((d - g0).norm()) <= 2.0 * float(g0.norm()) * (1 + 1e-6)   # feasible


@pytest.mark.parametrize("backend", [b for b in ISSUE27_BACKENDS if b != "triton"])
@pytest.mark.parametrize("c", [0.4, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_issue27_cagrad_reaches_the_primal_optimum(backend, c, seed):
    """Case 2: 0 not in the hull (20 x 100): pairwise Frank-Wolfe stopped short (0.061 against
    0.079 on such a case); ``d`` now attains the primal optimum of an independent solve."""
    J = torch.randn(20, 100, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    J = J + 0.3 * torch.randn(1, 100, generator=torch.Generator().manual_seed(99),
                              dtype=torch.float64)
    with gradops.use_backend(backend):
        w, st = W.cagrad(J @ J.T, c=c, rescale=0, return_status=True)
    assert bool(st.converged), st
    d = w @ J
    g0 = J.mean(0)
    assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)       # feasible
    m2 = float(J.norm(dim=1).max()) ** 2
    opt = _cagrad_primal(J, c)
    assert abs(float((J @ d).min()) - opt) <= 1e-7 * m2, (float((J @ d).min()), opt)


# ----------------------------------------------------------------------------------------- #
# the C++ and Triton solvers against the torch loop (tests/weighting/test_solvers.py: the other
# methods' and the shared ones)
# ----------------------------------------------------------------------------------------- #

def _cagrad_problem(G: torch.Tensor, c: float):
    """CAGrad's Frank-Wolfe problem as gradops.weighting.cagrad sets it up."""
    G = WC._prep(G, "test")
    T = G.shape[0]
    b = G.sum(1) / T
    k = c * torch.sqrt(torch.clamp(b.sum() / T, min=0.0))
    scale = torch.clamp(G.diagonal().max(), min=WC._tiny(G))
    delta2 = (math.sqrt(WC._eps(G)) ** 2) * scale + WC._tiny(G)
    return G, b, k, delta2, scale


def _cagrad_objective(w, G, b, k, delta2) -> float:
    w, G, b = w.double(), G.double(), b.double()
    return float(b @ w + float(k) * torch.sqrt(torch.clamp(w @ G @ w, min=0.0) + float(delta2)))


@pytest.mark.parametrize("backend,name", _bn(list(CASES)))
@pytest.mark.parametrize("c", [0.1, 0.4, 1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_solver_matches_torch(name, c, dtype, backend):
    """The Frank-Wolfe solve itself, default budget and tolerance: both converge, and their
    objective values are within the certificate ``f(w) - f* <= residual * scale``."""
    G, b, k, delta2, scale = _cagrad_problem(_gram(CASES[name], dtype), c)
    res = {}
    for bk in ("torch", backend):
        with gradops.use_backend(bk):
            res[bk] = WS._simplex_qp(G, 250, 1e-6, scale, b=b, k=k, delta2=delta2)
    (w_t, st_t), (w_c, st_c) = res["torch"], res[backend]
    assert bool(st_t.converged) and bool(st_c.converged), (st_t, st_c)
    assert _its_close(int(st_t.iterations), int(st_c.iterations)), (st_t, st_c)
    assert bool((w_c >= 0).all()) and abs(float(w_c.double().sum()) - 1.0) < 1e-6
    f_t, f_c = (_cagrad_objective(w, G, b, k, delta2) for w in (w_t, w_c))
    noise = 1e-6 if dtype == torch.float32 else 1e-13
    slack = (max(float(st_t.residual), float(st_c.residual), 0.0) + noise) * float(scale)
    assert abs(f_t - f_c) <= slack, (f_t, f_c, slack)


@pytest.mark.parametrize("backend,name", _bn(list(CASES)))
@pytest.mark.parametrize("c,rescale", [(0.4, 1), (0.5, 0), (2.0, 2), (0.0, 1), (0.0, 0)])
def test_cagrad_weights_match_torch(name, c, rescale, backend):
    """Public API, default settings: same status; c = 0 is the exact mean (no solve)."""
    G = _gram(CASES[name], torch.float32)
    (w_t, st_t), (w_c, st_c) = _both(W.cagrad, G, c, rescale, backend=backend)
    assert w_c.dtype == w_t.dtype == torch.float32
    _same_status_types(st_t, st_c)
    assert bool(st_t.converged) and bool(st_c.converged)
    if c == 0:
        assert torch.equal(w_c, w_t) and int(st_c.iterations) == 0
    else:
        assert _its_close(int(st_t.iterations), int(st_c.iterations)), (st_t, st_c)


# ----------------------------------------------------------------------------------------- #
# TorchJD 0.18 cross-checks (their weightings take the Gramian)
# ----------------------------------------------------------------------------------------- #

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


@pytest.mark.parametrize("T", [3, 5])
def test_torchjd_cagrad(T):
    """TorchJD's CAGrad(c) is ours with rescale=0 (it solves with cvxpy/CLARABEL)."""
    pytest.importorskip("cvxpy", reason="TorchJD's CAGrad needs cvxpy (pip install "
                                        "'torchjd[cagrad]'), not in requirements-dev")
    J = make_jac(T)
    G = gram(J)
    theirs = torchjd_aggregation.CAGradWeighting(c=0.4)(G)
    ours = W.cagrad(G, c=0.4, rescale=0, **TIGHT["cagrad"])
    assert_update_close(update(ours, J), update(theirs, J), J, 1e-4)
