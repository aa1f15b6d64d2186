"""Nash-MTL (Navon et al., ICML 2022), ``gradops.weighting.nashmtl``: the bargaining solution
against scipy (tests/method_references.py) with and without the clip, its defining equation,
degenerate Jacobians (defined, and undefined ones reported by the status), scaling, the TorchJD
0.18 cross-check."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradops import weighting as W

import method_references as R
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
