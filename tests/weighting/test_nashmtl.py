"""Nash-MTL (Navon et al., ICML 2022), ``gradops.weighting.nashmtl``: the bargaining solution
against scipy (tests/method_references.py) with and without the clip, its defining equation,
degenerate Jacobians (defined, and undefined ones reported by the status), scaling, the reported
failures at Pareto-stationary points reproduced (also through ``MTLOptimizer``), the TorchJD 0.18
cross-check."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradops
from gradops import weighting as W
from gradops.optim import MTLOptimizer
from gradops.weighting import mgda, nashmtl

import method_references as R
from backend_lists import cpu_backends
from weighting_helpers import (DEGENERATE, TIGHT, TS, _call, assert_update_close, gram, make_jac,
                               update)


# ----------------------------------------------------------------------------------------- #
# against the vector-form references, random Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("T", TS)
def test_nashmtl_matches_scipy(T, solver_backend):
    J = make_jac(T)
    for max_norm in (0.0, 1.0, 10.0):
        ref, alpha, resid = R.nashmtl_reference(J, max_norm=max_norm)
        assert resid < 1e-9
        w, st = W.nashmtl(gram(J), max_norm=max_norm, **TIGHT["nashmtl"], return_status=True)
        assert bool(st.converged)
        assert_update_close(update(w, J), ref, J, 1e-8, f"fp64 max_norm={max_norm}")
        w32, st32 = W.nashmtl(gram(J, torch.float32), max_norm=max_norm, return_status=True)
        assert bool(st32.converged)
        assert_update_close(update(w32, J), ref, J, 1e-4, f"fp32 max_norm={max_norm}")


def test_nashmtl_bargaining_equation():
    """alpha > 0 and alpha_i (G alpha)_i = 1 (no clip); ||d||^2 = T; clip gives ||d|| = 1."""
    J = make_jac(8)
    G = gram(J)
    a = W.nashmtl(G, max_norm=0.0, **TIGHT["nashmtl"])
    assert bool((a > 0).all())
    torch.testing.assert_close(a * (G @ a), torch.ones(8, dtype=torch.float64), rtol=0,
                               atol=1e-10)
    assert abs(float(a @ G @ a) - 8.0) < 1e-9
    c = W.nashmtl(G)
    assert abs(float(c @ G @ c) - 1.0) < 1e-9
    torch.testing.assert_close(c, a / math.sqrt(8.0))


# ----------------------------------------------------------------------------------------- #
# degenerate Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", ["duplicate_rows", "zero_row", "T1", "rank3_of_5_positive"])
def test_nashmtl_degenerate_defined(name, solver_backend):
    """Where the bargaining solution exists: duplicates get equal weights, a zero gradient gets 0
    and the others are solved without it; rank-deficient J without 0 in the hull is fine."""
    J = DEGENERATE[name]
    keep = [0, 2, 3] if name == "zero_row" else list(range(J.shape[0]))
    ref, _, resid = R.nashmtl_reference(J[keep], max_norm=0.0)
    assert resid < 1e-8
    w, st = W.nashmtl(gram(J), max_norm=0.0, **TIGHT["nashmtl"], return_status=True)
    assert bool(st.converged)
    assert_update_close(update(w, J), ref, J, 1e-7, name)
    if name == "zero_row":
        assert float(w[1]) == 0.0
    if name == "duplicate_rows":
        assert abs(float(w[0] - w[2])) < 1e-9 * float(w.abs().max())


@pytest.mark.parametrize("name", ["T40_P10", "rank2_of_5_mixed", "opposite_pair"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nashmtl_undefined_reports(name, dtype, solver_backend):
    """0 in the convex hull of the gradients: no positive solution of G a = 1/a exists. The
    solver must say so, and the clipped weights stay finite with ||d|| <= max_norm."""
    J = DEGENERATE[name]
    w, st = W.nashmtl(gram(J, dtype), return_status=True)
    assert not bool(st.converged) and int(st.iterations) == 20
    assert bool(torch.isfinite(w).all())
    assert np.linalg.norm(update(w, J)) <= 1.0 + 1e-4


# ----------------------------------------------------------------------------------------- #
# permutation equivariance and scaling
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("s", [1e-3, 7.0, 1e4])
def test_nashmtl_scaling(s):
    """alpha(s^2 G) = alpha(G) / s: d is invariant to the scale of J (before the clip)."""
    G = gram(make_jac(5))
    a, as_ = _call("nashmtl", G, max_norm=0.0), _call("nashmtl", s * s * G, max_norm=0.0)
    torch.testing.assert_close(as_ * s, a, rtol=1e-8, atol=0)


# the loops over hundreds of inputs run on the compiled backends; interpreted Triton (seconds
# per solve) takes the single reproductions above them
LOOP_BACKENDS = [b for b in cpu_backends() if b != "triton"]



# --- reproduced: Nash-MTL at a Pareto-stationary point (the reported failures) --------------------

def _hull_distance2(G: torch.Tensor) -> float:
    """``min_{w in simplex} w^T G w / max_i G_ii`` in float64 (MGDA, a generous budget)."""
    G = G.double()
    with gradops.use_backend(LOOP_BACKENDS[-1]):     # C++ where built (not interpreted Triton)
        w = mgda(G, max_iter=20000, tol=1e-12)
    return float(w @ G @ w / G.diagonal().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nashmtl_opposite_gradients_give_a_zero_update_flagged(cpu_backend, dtype):
    """``J = [[1, 0], [-1, 0]]`` (no Nash solution: 0 is in the hull) gave weights 1.3e19 in
    float32 and 9.5e153 in float64; now ``w = 0``, not converged, ``residual = inf``."""
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=dtype)
    w, st = nashmtl(J @ J.T, return_status=True)
    assert w.tolist() == [0.0, 0.0]
    assert not bool(st.converged) and float(st.residual) == float("inf")


@pytest.mark.parametrize("backend", LOOP_BACKENDS)
def test_nashmtl_random_rank_one_inputs_stay_bounded(backend):
    """300 random rank-1 ``J`` (8 gave NaN before): finite weights, ``||d|| <= max_norm``, and
    ``no solution`` exactly where the tasks' signs differ (0 in the hull)."""
    with gradops.use_backend(backend):
        _rank_one_cases(300)


def _rank_one_cases(n):
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        T = int(torch.randint(2, 9, (1,), generator=g))
        c = torch.randn(T, 1, generator=g)
        J = c @ torch.randn(1, 6, generator=g)
        w, st = nashmtl(J @ J.T, return_status=True)
        assert torch.isfinite(w).all(), seed
        assert float((w @ J).norm()) <= 1.0 + 1e-4, seed
        mixed = bool((c > 0).any() and (c < 0).any())
        assert bool(torch.isinf(st.residual)) == mixed, seed
        if mixed:
            assert (w == 0).all() and not bool(st.converged)
        else:
            assert bool(st.converged), seed


@pytest.mark.parametrize("scale", [1e-10, 1.0, 1e10, 1e15])
def test_nashmtl_zero_in_hull_detected_at_every_scale(cpu_backend, scale):
    """A zero-in-the-hull ``J`` (task 3 = -(task 1 + task 2) / 2) scaled by 1e-10 .. 1e15 (NaN at
    1e10 before) is flagged; a solvable one keeps its scale-free answer (``alpha s``)."""
    J0 = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 1.0], [-0.75, -0.5, -0.5]])
    w, st = nashmtl((J0 * scale) @ (J0 * scale).T, return_status=True)
    assert (w == 0).all() and float(st.residual) == float("inf")
    assert _hull_distance2(J0 @ J0.T) < 1e-12
    J1 = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 1.0, 0.0], [0.5, 1.0, 1.0]])
    w1, st1 = nashmtl((J1 * scale) @ (J1 * scale).T, return_status=True, max_norm=0.0)
    w0 = nashmtl(J1 @ J1.T, max_norm=0.0)
    assert bool(st1.converged)
    torch.testing.assert_close(w1.double() * scale, w0.double(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", LOOP_BACKENDS)
@pytest.mark.parametrize("T,P", [(8, 3), (20, 10), (3, 10)])
def test_nashmtl_flag_agrees_with_pareto_stationarity(backend, T, P):
    """Flagged inputs have ``min_{w in simplex} w^T G w ~ 0`` (Pareto-stationary); the others
    have a finite answer with ``||d|| <= 1``. Every weight is finite."""
    with gradops.use_backend(backend):
        _flag_cases(T, P, 25)


def _flag_cases(T, P, n):
    for seed in range(n):
        J = torch.randn(T, P, generator=torch.Generator().manual_seed(seed))
        G = J @ J.T
        w, st = nashmtl(G, return_status=True)
        assert torch.isfinite(w).all()
        if bool(torch.isinf(st.residual)):
            assert (w == 0).all() and _hull_distance2(G) < 1e-5, seed
        else:
            assert float((w @ J).norm()) <= 1.0 + 1e-4
            if bool(st.converged):
                assert _hull_distance2(G) > 1e-7, seed


def test_nashmtl_no_solution_shows_in_optimizer_stats():
    """Through ``MTLOptimizer``: a Pareto-stationary step is a zero update, counted in
    ``stats()["nonconverged"]`` and ``stats()["no_solution"]``, with its own warning."""
    x = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    opt = MTLOptimizer(torch.optim.SGD([x], lr=0.1), method="nashmtl", shared=[x])
    for _ in range(3):
        opt.zero_grad()
        info = opt.backward([x[0] * 2.0, -x[0]])   # gradients (2, 0) and (-1, 0)
        assert not bool(info.converged)
        assert (x.grad == 0).all()
        opt.step()
    with pytest.warns(RuntimeWarning, match="no solution on 3 of 3"):
        s = opt.stats()
    assert s["nonconverged"] == 3 and s["no_solution"] == 3


# ----------------------------------------------------------------------------------------- #
# TorchJD 0.18 cross-checks (their weightings take the Gramian)
# ----------------------------------------------------------------------------------------- #

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


def test_torchjd_nashmtl():
    """TorchJD's Nash-MTL (the authors' CCP, 20 cvxpy solves) approximates our exact fixed
    point; compared loosely (their CCP stops early)."""
    pytest.importorskip("cvxpy", reason="TorchJD's NashMTL needs cvxpy + ecos (pip install "
                                        "'torchjd[nash_mtl]'), not in requirements-dev")
    J = make_jac(3).float()
    agg = torchjd_aggregation.NashMTL(n_tasks=3, max_norm=0.0, optim_niter=200)
    theirs = agg.weighting(J)
    ours = W.nashmtl(gram(J.double()), max_norm=0.0, **TIGHT["nashmtl"])
    assert_update_close(update(ours, J), update(theirs, J), J, 5e-2)
