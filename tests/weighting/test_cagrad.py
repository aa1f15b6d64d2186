"""CAGrad (Liu et al., NeurIPS 2021), ``gradops.weighting.cagrad``: the update against SLSQP on
the paper's dual (tests/method_references.py) on random and degenerate Jacobians, ``c = 0`` as
the mean, the TorchJD 0.18 cross-check."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradops import weighting as W

import method_references as R
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
