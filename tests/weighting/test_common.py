"""gradops.weighting, the properties every method shares: finite weights on degenerate Jacobians,
permutation equivariance, invariance to the scale of ``J``, solver status, dtypes, non-finite
propagation, errors, the registry, no host sync (fullgraph compile, no host reads) and the CPU
early exit. Each method's own math against its reference is in tests/weighting/test_<method>.py.
"""
from __future__ import annotations

import pytest
import torch

import gradops
from gradops import weighting as W

from weighting_helpers import DEGENERATE, _call, gram, make_jac


# ----------------------------------------------------------------------------------------- #
# degenerate Jacobians
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("method", sorted(W.METHODS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_degenerate_no_nan(name, method, dtype, solver_backend):
    """Every method returns finite weights on every degenerate Jacobian (also where a method
    has no solution, e.g. Nash-MTL with 0 in the hull: then the status says so)."""
    J = DEGENERATE[name]
    kw = {"perms": gradops.random_orders(J.shape[0], generator=torch.Generator()
                                         .manual_seed(0))} if method == "pcgrad" else {}
    # PCGrad's recurrence is a kernel op: float64 runs on the torch path (a forced C++ backend
    # refuses it, tests/ops/test_float64.py); the fixture is about the iterative solvers' loops
    with gradops.use_backend("torch" if method == "pcgrad" and dtype == torch.float64 else
                             solver_backend):
        w, st = W.get(method)(gram(J, dtype), **kw, return_status=True)
    assert w.shape == (J.shape[0],) and w.dtype in (dtype, torch.float32)
    assert bool(torch.isfinite(w).all()), w
    if method not in W.ITERATIVE:
        assert bool(st.converged)


# ----------------------------------------------------------------------------------------- #
# permutation equivariance and scaling
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("method", sorted(W.METHODS))
@pytest.mark.parametrize("T", [3, 8])
def test_permutation_equivariance(method, T):
    J = make_jac(T, seed=3)
    G = gram(J)
    pi = torch.randperm(T, generator=torch.Generator().manual_seed(T))
    Gp = G[pi][:, pi]                              # task k of the new problem = task pi[k]
    kw, kwp = {}, {}
    if method == "pcgrad":
        perms = gradops.random_orders(T, generator=torch.Generator().manual_seed(1))
        inv = torch.argsort(pi)
        kw, kwp = {"perms": perms}, {"perms": inv[perms[pi]]}
    w, wp = _call(method, G, **kw), _call(method, Gp, **kwp)
    torch.testing.assert_close(wp, w[pi], rtol=1e-6, atol=1e-9 * float(w.abs().max()))


INVARIANT = ("ew", "mgda", "cagrad", "imtlg", "alignedmtl", "pcgrad")


@pytest.mark.parametrize("method", INVARIANT)
@pytest.mark.parametrize("s", [1e-3, 7.0, 1e4])
def test_weights_invariant_to_scaling_J(method, s):
    """J -> sJ (G -> s^2 G): the weights of these methods do not change; d scales by s."""
    G = gram(make_jac(5))
    kw = {"perms": gradops.random_orders(5, generator=torch.Generator().manual_seed(0))} \
        if method == "pcgrad" else {}
    w, ws = _call(method, G, **kw), _call(method, s * s * G, **kw)
    torch.testing.assert_close(ws, w, rtol=1e-6, atol=1e-9 * float(w.abs().max()))


# ----------------------------------------------------------------------------------------- #
# status, dtypes, errors, registry
# ----------------------------------------------------------------------------------------- #

@pytest.mark.parametrize("method", sorted(W.ITERATIVE))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_status_reports_non_convergence(method, dtype, solver_backend):
    G = gram(make_jac(8, seed=1), dtype)    # (seed 0: CAGrad's optimum is its starting vertex)
    w, st = W.get(method)(G, max_iter=1, return_status=True)
    assert isinstance(st, W.SolverStatus)
    assert st.converged.dtype == torch.bool and st.converged.shape == ()
    assert st.iterations.dtype == torch.int64 and int(st.iterations) == 1
    assert st.residual.shape == () and st.residual.device == G.device
    assert not bool(st.converged)
    assert bool(torch.isfinite(w).all())           # the best iterate, never a fallback
    w0, st0 = W.get(method)(G, max_iter=0, return_status=True)
    assert int(st0.iterations) == 0 and not bool(st0.converged)
    w, st = W.get(method)(G, return_status=True)
    assert bool(st.converged) and 0 < int(st.iterations) < 250
    assert float(st.residual) <= {"mgda": 1e-5, "cagrad": 1e-6, "nashmtl": 1e-5}[method]


@pytest.mark.parametrize("method", ["ew", "imtlg", "alignedmtl", "pcgrad"])
def test_closed_form_status(method):
    with gradops.use_backend("torch"):
        w, st = W.get(method)(gram(make_jac(4)), return_status=True)
    assert bool(st.converged) and int(st.iterations) == 0 and float(st.residual) == 0.0


@pytest.mark.parametrize("method", sorted(W.METHODS))
def test_non_finite_gram_propagates(method):
    """NaN in G: never a crash, never a silently finite answer that claims success."""
    G = gram(make_jac(4))
    G[1, 2] = G[2, 1] = float("nan")
    with gradops.use_backend("torch"):
        kw = {"perms": gradops.random_orders(4, generator=torch.Generator().manual_seed(0))} \
            if method == "pcgrad" else {}
        w, st = W.get(method)(G, **kw, return_status=True)
    assert not bool(st.converged)
    assert not bool(torch.isfinite(w).all())


@pytest.mark.parametrize("method", sorted(W.METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(method, dtype):
    G = gram(make_jac(3), dtype)
    with gradops.use_backend("torch"):
        kw = {"perms": gradops.random_orders(3, generator=torch.Generator().manual_seed(0))} \
            if method == "pcgrad" else {}
        w = W.get(method)(G, **kw)
    expected = torch.float64 if dtype == torch.float64 else torch.float32   # pcgrad too
    assert w.dtype == expected and w.device == G.device and w.shape == (3,)


def test_errors():
    G = gram(make_jac(3))
    with pytest.raises(ValueError, match="square"):
        W.mgda(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="floating"):
        W.imtlg(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="normalization"):
        W.mgda(G, normalization="l1")
    with pytest.raises(ValueError, match="losses"):
        W.mgda(G, normalization="loss")
    with pytest.raises(ValueError, match="max_iter"):
        W.nashmtl(G, max_iter=2.5)
    with pytest.raises(ValueError, match="rescale"):
        W.cagrad(G, rescale=3)
    with pytest.raises(ValueError, match="scale_mode"):
        W.alignedmtl(G, scale_mode="max")
    with pytest.raises(ValueError, match="reduction"):
        W.ew(G, reduction="prod")


def test_registry():
    assert set(W.METHODS) == {"ew", "mgda", "cagrad", "imtlg", "nashmtl", "alignedmtl", "pcgrad"}
    assert W.get("IMTL-G") is W.imtlg and W.get("Nash_MTL") is W.nashmtl
    assert W.get("Aligned-MTL") is W.alignedmtl
    with pytest.raises(ValueError, match="valid names: alignedmtl, cagrad, ew, imtlg"):
        W.get("famo")
    assert gradops.weighting is W


# ----------------------------------------------------------------------------------------- #
# no host synchronisation
# ----------------------------------------------------------------------------------------- #

SMALL = {"mgda": dict(max_iter=4), "cagrad": dict(max_iter=4), "nashmtl": dict(max_iter=3)}


@pytest.mark.parametrize("method,kw", [("ew", {}), ("mgda", {}), ("mgda", {"normalization": "l2"}),
                                       ("cagrad", {}), ("imtlg", {}), ("nashmtl", {}),
                                       ("alignedmtl", {}), ("alignedmtl", {"scale_mode": "median"}),
                                       ("alignedmtl", {"scale_mode": "rmse"})])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fullgraph_compile(method, kw, backend):
    """Dynamo traces every solver as one graph: any .item(), Python branch on a tensor or
    .cpu() would be a graph break, which fullgraph=True turns into an error."""
    torch._dynamo.reset()
    G = gram(make_jac(5), torch.float32)
    kw = {**SMALL.get(method, {}), **kw}
    fn = W.get(method)

    def f(G):
        return fn(G, **kw, return_status=True)

    w, st = torch.compile(f, fullgraph=True, backend=backend)(G)
    with gradops.use_backend("torch"):   # compiled code always runs the torch loop
        w0, st0 = f(G)
    torch.testing.assert_close(w, w0)
    assert bool(st.converged == st0.converged) and int(st.iterations) == int(st0.iterations)


@pytest.mark.parametrize("method", sorted(W.METHODS))
def test_no_host_reads(method, monkeypatch):
    """Eager run with every tensor -> Python conversion disabled."""
    G = gram(make_jac(5), torch.float32)
    kw = {"perms": gradops.random_orders(5, generator=torch.Generator().manual_seed(0))} \
        if method == "pcgrad" else {}
    if method in W.ITERATIVE:   # the CPU early exit reads `done`; on a GPU it is off
        kw["early_exit"] = False

    def boom(*a, **k):
        raise AssertionError("host read of a tensor value")

    with gradops.use_backend("torch"):
        for attr in ("item", "__bool__", "tolist", "__float__", "__int__", "__index__",
                     "numpy"):
            monkeypatch.setattr(torch.Tensor, attr, boom)
        if method == "pcgrad":   # pcgrad_weights validates CPU perms by value (its own design)
            import sys
            monkeypatch.setattr(sys.modules["gradops.ops.pcgrad"], "_check_weights_args",
                                lambda *a: None)
        W.get(method)(G, **kw, return_status=True)


@pytest.mark.parametrize("method", sorted(W.ITERATIVE))
def test_early_exit_returns_what_the_full_budget_returns(method, solver_backend):
    """On CPU the iterative solvers stop once converged; the iterate is frozen from then on, so
    the weights and the status equal those of the full budget (the C++ loop always stops)."""
    for T in (3, 8, 40):
        G = gram(make_jac(T), torch.float32)
        w_full, st_full = W.get(method)(G, early_exit=False, return_status=True)
        w_fast, st_fast = W.get(method)(G, return_status=True)
        assert torch.equal(w_full, w_fast)
        assert bool(st_full.converged) == bool(st_fast.converged)
        assert int(st_full.iterations) == int(st_fast.iterations)
