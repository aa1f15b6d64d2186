"""gradops.weighting: each method's update ``d = w^T J`` against an independent vector-form
reference (tests/method_references.py), on random and degenerate Jacobians; permutation and
scaling properties; solver status; TorchJD 0.18 cross-checks; no host sync (fullgraph compile).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradops
from gradops import weighting as W

import method_references as R
from backend_lists import cpu_backends

TS = (1, 2, 3, 5, 8, 40)
P = 64


def make_jac(T: int, P: int = P, seed: int = 0, common: float = 0.5) -> torch.Tensor:
    """Task gradients with different scales (0.1..3) and a shared component (some conflict,
    mostly positive correlation, like real task gradients), fp64."""
    g = torch.Generator().manual_seed(1000 * T + seed)
    Z = torch.randn(T, P, generator=g, dtype=torch.float64)
    Z = Z + common * torch.randn(1, P, generator=g, dtype=torch.float64)
    scales = 0.1 + 2.9 * torch.rand(T, 1, generator=g, dtype=torch.float64)
    return Z * scales


def degenerate_jacs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    B = torch.randn(3, 30, generator=g, dtype=torch.float64)
    out = {}
    out["rank3_of_5_positive"] = torch.rand(5, 3, generator=g, dtype=torch.float64) @ B
    out["rank2_of_5_mixed"] = torch.randn(5, 2, generator=g, dtype=torch.float64) @ B[:2]
    J = torch.randn(4, 30, generator=g, dtype=torch.float64)
    J[2] = J[0]
    out["duplicate_rows"] = J
    J = torch.randn(4, 30, generator=g, dtype=torch.float64)
    J[1] = 0.0
    out["zero_row"] = J
    out["T1"] = torch.randn(1, 30, generator=g, dtype=torch.float64)
    out["T40_P10"] = torch.randn(40, 10, generator=g, dtype=torch.float64)
    J = torch.randn(3, 30, generator=g, dtype=torch.float64)
    J[1] = -J[0]
    out["opposite_pair"] = J
    out["all_zero"] = torch.zeros(3, 10, dtype=torch.float64)
    return out


DEGENERATE = degenerate_jacs()


def gram(J: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    X = J.to(dtype)
    return X @ X.T


def update(w: torch.Tensor, J: torch.Tensor) -> np.ndarray:
    return (w.double() @ J.double()).numpy()


def max_norm_of(J: torch.Tensor) -> float:
    return max(float(J.norm(dim=1).max()), 1e-300)


def assert_update_close(d: np.ndarray, ref: np.ndarray, J: torch.Tensor, rel: float, what=""):
    """``||d - ref|| <= rel * max_i ||g_i||`` (scale of the problem, meaningful when ref ~ 0)."""
    err = float(np.linalg.norm(d - ref)) / max_norm_of(J)
    assert err <= rel, f"{what}: ||d - ref|| / max ||g_i|| = {err:.3g} > {rel:.3g}"


SOLVER_BACKENDS = [b for b in cpu_backends() if b in ("torch", "cpp")]


@pytest.fixture(params=SOLVER_BACKENDS)
def solver_backend(request):
    """Where the iterative solvers' loops run on CPU: the torch reference loop or the C++ kernels
    (csrc/weighting_cpu.cpp; tests/test_weighting_solvers.py compares every backend, Triton too,
    with the torch loops directly)."""
    with gradops.use_backend(request.param):
        yield request.param


TIGHT = {"mgda": dict(max_iter=1500, tol=1e-12), "cagrad": dict(max_iter=1000, tol=1e-12),
         "nashmtl": dict(max_iter=40, tol=1e-12)}


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


@pytest.mark.parametrize("T", TS)
def test_imtlg_matches_closed_form(T):
    J = make_jac(T)
    ref, alpha = R.imtlg_reference(J)
    w = W.imtlg(gram(J))
    assert_update_close(update(w, J), ref, J, 1e-8, "fp64")
    np.testing.assert_allclose(w.numpy(), alpha, rtol=1e-6, atol=1e-9)
    assert_update_close(update(W.imtlg(gram(J, torch.float32)), J), ref, J, 1e-3, "fp32")


def test_imtlg_equal_projections():
    """The defining property: d has the same projection on every unit gradient, sum(w) = 1."""
    J = make_jac(8)
    w = W.imtlg(gram(J))
    d = torch.from_numpy(update(w, J))
    proj = (J @ d) / J.norm(dim=1)
    assert float(proj.std() / proj.mean()) < 1e-9
    assert abs(float(w.sum()) - 1.0) < 1e-12


def test_imtlg_ridge():
    """ridge damps the kept eigenvalues: a tiny ridge changes nothing on a regular G, any ridge
    stays finite on singular ones."""
    G = gram(make_jac(8))
    torch.testing.assert_close(W.imtlg(G, ridge=1e-13), W.imtlg(G), rtol=1e-8, atol=1e-10)
    for J in DEGENERATE.values():
        assert bool(torch.isfinite(W.imtlg(gram(J, torch.float32), ridge=1e-3)).all())


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


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_alignedmtl_matches_svd(T, scale_mode):
    J = make_jac(T)
    ref = R.alignedmtl_reference(J, scale_mode)
    assert_update_close(update(W.alignedmtl(gram(J), scale_mode), J), ref, J, 1e-8, "fp64")
    assert_update_close(update(W.alignedmtl(gram(J, torch.float32), scale_mode), J), ref, J,
                        1e-3, "fp32")


def test_alignedmtl_aligned_gradients():
    """The balance transformation makes B J orthonormal up to sqrt(l_min): B G B = l_min I."""
    J = make_jac(5)
    G = gram(J)
    l, V = torch.linalg.eigh(G)
    B = math.sqrt(float(l.min())) * V @ torch.diag(l.rsqrt()) @ V.T
    torch.testing.assert_close(B @ G @ B, float(l.min()) * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(W.alignedmtl(G), B.sum(0))


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_pcgrad_matches_vector_form(T, reduction):
    from gradops.reference import pcgrad_reference
    J = make_jac(T)
    perms = gradops.random_orders(T, generator=torch.Generator().manual_seed(T))
    with gradops.use_backend("torch"):
        w = W.pcgrad(gram(J), perms=perms, reduction=reduction)
        torch.testing.assert_close(w, gradops.pcgrad_weights(gram(J), perms=perms,
                                                             reduction=reduction))
    ref = pcgrad_reference(J, perms, reduction).numpy()
    assert_update_close(update(w, J), ref, J, 1e-4)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ew(reduction):
    G = gram(make_jac(5))
    w = W.ew(G, reduction)
    torch.testing.assert_close(w, torch.full((5,), 1.0 if reduction == "sum" else 0.2,
                                             dtype=torch.float64))


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
    # refuses it, tests/test_float64.py); the fixture is about the iterative solvers' loops
    with gradops.use_backend("torch" if method == "pcgrad" and dtype == torch.float64 else
                             solver_backend):
        w, st = W.get(method)(gram(J, dtype), **kw, return_status=True)
    assert w.shape == (J.shape[0],) and w.dtype in (dtype, torch.float32)
    assert bool(torch.isfinite(w).all()), w
    if method not in W.ITERATIVE:
        assert bool(st.converged)


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


@pytest.mark.parametrize("name", ["duplicate_rows", "zero_row", "T1", "rank3_of_5_positive"])
def test_imtlg_degenerate_vs_vector_form(name):
    """Duplicates share their weight (the pseudo-inverse form); a zero gradient gets weight 0
    and the rest is IMTL-G of the other tasks."""
    J = DEGENERATE[name]
    w = W.imtlg(gram(J))
    if name == "zero_row":
        ref, _ = R.imtlg_reference(J[[0, 2, 3]])
        assert float(w[1]) == 0.0
    elif name == "rank3_of_5_positive":
        import torchjd.aggregation as A
        ref = update(A.IMTLGWeighting()(gram(J)), J)
    else:
        ref, _ = R.imtlg_reference(J, pinv=True)
    assert_update_close(update(w, J), ref, J, 1e-8, name)
    if name == "duplicate_rows":
        assert abs(float(w[0] - w[2])) < 1e-10


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


@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_alignedmtl_degenerate(name, scale_mode):
    J = DEGENERATE[name]
    ref = R.alignedmtl_reference(J, scale_mode)
    assert_update_close(update(W.alignedmtl(gram(J), scale_mode), J), ref, J, 1e-7, name)


# ----------------------------------------------------------------------------------------- #
# permutation equivariance and scaling
# ----------------------------------------------------------------------------------------- #

def _call(method, G, **kw):
    kw = {**TIGHT.get(method, {}), **kw}
    with gradops.use_backend("torch"):
        return W.get(method)(G, **kw)


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


@pytest.mark.parametrize("s", [1e-3, 7.0, 1e4])
def test_nashmtl_scaling(s):
    """alpha(s^2 G) = alpha(G) / s: d is invariant to the scale of J (before the clip)."""
    G = gram(make_jac(5))
    a, as_ = _call("nashmtl", G, max_norm=0.0), _call("nashmtl", s * s * G, max_norm=0.0)
    torch.testing.assert_close(as_ * s, a, rtol=1e-8, atol=0)


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


def test_cagrad_c0_is_mean():
    G = gram(make_jac(5))
    torch.testing.assert_close(W.cagrad(G, c=0.0, rescale=0), torch.full((5,), 0.2,
                                                                        dtype=torch.float64))


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
# TorchJD 0.18 cross-checks (their weightings take the Gramian)
# ----------------------------------------------------------------------------------------- #

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


@pytest.mark.parametrize("name", ["random5", "random40"] + list(DEGENERATE))
def test_torchjd_imtlg(name):
    J = make_jac(5) if name == "random5" else make_jac(40) if name == "random40" \
        else DEGENERATE[name]
    G = gram(J)
    theirs = torchjd_aggregation.IMTLGWeighting()(G)
    ours = W.imtlg(G)
    if J.shape[0] == 1 and float(G[0, 0]) == 0:
        return
    assert_update_close(update(ours, J), update(theirs, J), J, 1e-8, name)


@pytest.mark.parametrize("name", ["random5", "random40"] + list(DEGENERATE))
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_torchjd_alignedmtl(name, scale_mode):
    """TorchJD uses the mean preference vector: its weights are ours / T."""
    J = make_jac(5) if name == "random5" else make_jac(40) if name == "random40" \
        else DEGENERATE[name]
    G = gram(J)
    theirs = torchjd_aggregation.AlignedMTLWeighting(scale_mode=scale_mode)(G)
    ours = W.alignedmtl(G, scale_mode)
    assert_update_close(update(ours / J.shape[0], J), update(theirs, J), J, 1e-9, name)


@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_torchjd_mgda(T):
    """Their plain Frank-Wolfe (Sener & Koltun Alg. 2) run long; ours is never worse."""
    J = make_jac(T)
    G = gram(J)
    theirs = torchjd_aggregation.MGDAWeighting(epsilon=1e-9, max_iters=20_000)(G)
    ours = W.mgda(G, **TIGHT["mgda"])
    assert float(ours @ G @ ours) <= float(theirs @ G @ theirs) + 1e-12 * float(G.diag().max())
    assert_update_close(update(ours, J), update(theirs, J), J, 1e-6)


def test_torchjd_pcgrad_two_tasks():
    """T = 2 has one order; TorchJD's PCGrad (sum) must agree exactly."""
    J = make_jac(2)
    J[1] = -J[0] + 0.3 * J[1]
    G = gram(J)
    with gradops.use_backend("torch"):
        ours = W.pcgrad(G)
    torch.testing.assert_close(ours.double(), torchjd_aggregation.PCGradWeighting()(G),
                               rtol=1e-5, atol=1e-6)


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
