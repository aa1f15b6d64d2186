"""MGDA (Sener & Koltun, NeurIPS 2018), ``gradops.weighting.mgda``: the min-norm point against
the vector-form reference of tests/method_references.py (and the paper's own Frank-Wolfe) on
random and degenerate Jacobians, for every normalization; the KKT conditions; invariance of the
l2 form to task scales; the TorchJD 0.18 cross-check; the Inductor-compiled solver."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradops import weighting as W

import method_references as R
from weighting_helpers import (DEGENERATE, TIGHT, TS, assert_update_close, gram, make_jac,
                               max_norm_of, update)


# ----------------------------------------------------------------------------------------- #
# against the vector-form references, random Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_matches_min_norm_point(T, normalization, solver_backend):
    J = make_jac(T)
    losses = torch.linspace(0.5, 2.0, T, dtype=torch.float64)
    ref = R.mgda_reference(J, normalization, losses)
    w, st = W.mgda(gram(J), normalization, losses, **TIGHT["mgda"], return_status=True)
    assert bool(st.converged)
    assert_update_close(update(w, J), ref, J, 1e-7, "fp64")
    # fp32, default budget: within the certificate ||d - d*||^2 <= residual * max Gn_ii
    w32, st32 = W.mgda(gram(J, torch.float32), normalization, losses.float(),
                       return_status=True)
    assert w32.dtype == torch.float32 and bool(st32.converged)
    s = {"none": torch.ones(T, dtype=torch.float64), "l2": J.norm(dim=1), "loss": losses,
         "loss+": losses * J.norm(dim=1)}[normalization]
    Jn = J / s[:, None]
    bound = math.sqrt(max(float(st32.residual), 0.0) * float((Jn * Jn).sum(1).max()))
    err = float(np.linalg.norm(update(w32, J) - ref))
    assert err <= 1.05 * bound + 1e-4 * max_norm_of(Jn), (err, bound)


def test_mgda_sener_koltun_fw_agrees():
    """The paper's own Frank-Wolfe (MinNormSolver, 250 iterations) lands near our solution."""
    J = make_jac(5)
    fw, _ = R.min_norm_point_sener_koltun_fw(J.numpy())
    assert_update_close(update(W.mgda(gram(J), **TIGHT["mgda"]), J), fw, J, 1e-3)
    assert_update_close(R.mgda_reference(J), fw, J, 1e-3)


# ----------------------------------------------------------------------------------------- #
# degenerate Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", list(DEGENERATE))
def test_mgda_degenerate(name, solver_backend):
    J = DEGENERATE[name]
    ref = R.mgda_reference(J)
    w, st = W.mgda(gram(J), max_iter=1500, tol=1e-13, return_status=True)
    bound = math.sqrt(max(float(st.residual), 0.0)) + 1e-7
    assert_update_close(update(w, J), ref, J, bound, name)
    assert bool(st.converged) or name == "T40_P10"   # 0 in the hull: sublinear, see status
    w32, st32 = W.mgda(gram(J, torch.float32), return_status=True)
    bound = 1.05 * math.sqrt(max(float(st32.residual), 0.0)) + 1e-4
    assert_update_close(update(w32, J), ref, J, bound, name + " fp32")


# ----------------------------------------------------------------------------------------- #
# permutation equivariance and scaling
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mgda_l2_invariant_to_task_scales(dtype):
    """With l2 normalisation, d does not depend on each task gradient's scale."""
    J = make_jac(6)
    c = torch.tensor([1e-3, 0.5, 2.0, 30.0, 1.0, 7.0], dtype=torch.float64)
    Jc = J * c[:, None]
    kw = TIGHT["mgda"] if dtype == torch.float64 else {}
    d = update(W.mgda(gram(J, dtype), "l2", **kw), J)
    dc = update(W.mgda(gram(Jc, dtype), "l2", **kw), Jc)
    rel = 1e-8 if dtype == torch.float64 else 5e-3
    assert np.linalg.norm(d - dc) <= rel * np.linalg.norm(d)


def test_mgda_kkt():
    """Optimality of the min-norm point: (G w)_i >= w^T G w for every task, w in the simplex."""
    G = gram(make_jac(8))
    w = W.mgda(G, **TIGHT["mgda"])
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-12
    Gw = G @ w
    assert float((w @ Gw - Gw).max()) <= 1e-12 * float(G.diagonal().max())


# ----------------------------------------------------------------------------------------- #
# TorchJD 0.18 cross-checks (their weightings take the Gramian)
# ----------------------------------------------------------------------------------------- #

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_torchjd_mgda(T):
    """Their plain Frank-Wolfe (Sener & Koltun Alg. 2) run long; ours is never worse."""
    J = make_jac(T)
    G = gram(J)
    theirs = torchjd_aggregation.MGDAWeighting(epsilon=1e-9, max_iters=20_000)(G)
    ours = W.mgda(G, **TIGHT["mgda"])
    assert float(ours @ G @ ours) <= float(theirs @ G @ theirs) + 1e-12 * float(G.diag().max())
    assert_update_close(update(ours, J), update(theirs, J), J, 1e-6)


# ----------------------------------------------------------------------------------------- #
# no host synchronisation
# ----------------------------------------------------------------------------------------- #

def test_inductor_compile_mgda():
    """Inductor's fused reductions round differently, so near-ties of the Frank-Wolfe vertex
    choice may go the other way: check the compiled iterate's quality, not bit equality."""
    torch._dynamo.reset()
    G = gram(make_jac(4), torch.float32)
    f = torch.compile(lambda G: W.mgda(G, max_iter=6, return_status=True), fullgraph=True)
    w, st = f(G)
    assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-6
    Gw = G @ w
    gap = float(2 * (w @ Gw - Gw.min()) / G.diagonal().max())
    assert abs(gap - float(st.residual)) <= 1e-5 + 1e-3 * gap
    _, st1 = W.mgda(G, max_iter=1, return_status=True)
    assert float(st.residual) < float(st1.residual)
