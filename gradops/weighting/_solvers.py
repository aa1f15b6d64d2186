"""The iterative solvers' loops (pairwise Frank-Wolfe for MGDA and CAGrad, damped Newton for
Nash-MTL) and where they run: the torch loops here are the reference (and serve
``torch.compile``, fake tensors and a ``G`` that requires grad); in eager mode the same
algorithms run in C++ on CPU tensors (``csrc/weighting_cpu.cpp``) and in one Triton program per
solve on CUDA tensors (:mod:`gradops.weighting._triton_solvers`)."""
from __future__ import annotations

import math

import torch

from .. import _backend
from .._backend import _C, register_op, select_backend
from .._validate import _is_fake
from . import _triton_solvers
from ._common import SolverStatus, _eps, _stop_early, _tiny

register_op("weighting_solvers", ("triton", "cpp", "torch"),
            max_t={"triton": _triton_solvers.MAX_T})


def _solver_backend(G: torch.Tensor) -> str:
    """Where an iterative solver's loop runs on ``G``: ``"triton"`` (one program per solve,
    :mod:`gradops.weighting._triton_solvers`; CUDA tensors with ``T <= 64``, or CPU tensors under
    ``TRITON_INTERPRET=1`` when forced), ``"cpp"`` (``csrc/weighting_cpu.cpp``, CPU tensors) or
    ``"torch"`` (the reference loops here).

    Always torch under ``torch.compile`` (the kernel calls are opaque to tracing) and for fake
    tensors. Otherwise :func:`gradops._backend.select_backend` decides (CUDA: Triton, else torch;
    CPU: C++, else torch), and a forced backend applies. A ``G`` that requires grad (with grad
    mode on) keeps the differentiable torch loop; forcing another backend for it raises.
    """
    if torch.compiler.is_compiling() or _is_fake(G):
        return "torch"
    backend = select_backend("weighting_solvers", G.device, G.shape[0])
    if backend != "torch" and G.requires_grad and torch.is_grad_enabled():
        if _backend.forced_backend() == backend:
            raise RuntimeError(f"gradops.weighting_solvers: forced backend {backend!r} cannot run "
                               "this call: G requires grad and only the torch solvers are "
                               "differentiable")
        return "torch"
    return backend


def _pairwise_fw(G: torch.Tensor, max_iter: int, tol: float, scale: torch.Tensor,
                 b: torch.Tensor | None = None, k: torch.Tensor | None = None,
                 delta2: torch.Tensor | None = None, early_exit: bool | None = None
                 ) -> tuple[torch.Tensor, SolverStatus]:
    """Pairwise Frank-Wolfe on the simplex, exact line search, fixed budget, all on device.

    Minimises ``f(w) = w^T G w`` (``b is None``: MGDA) or
    ``f(w) = b^T w + k sqrt(w^T G w + delta2)`` (CAGrad, smoothed). Each step moves mass
    ``gamma`` from the away vertex ``v`` (the support's largest partial derivative) to the
    Frank-Wolfe vertex ``s`` (the smallest), ``gamma`` in ``[0, w_v]`` minimising ``f`` exactly
    along ``e_s - e_v`` (closed forms below). Pairwise FW converges linearly on a polytope
    (Lacoste-Julien & Jaggi 2015), unlike plain FW's ``O(1/k)``; from ``w = 1/T`` it is
    symmetric in the tasks.

    The residual is the Frank-Wolfe duality gap ``grad . (w - e_s) >= f(w) - f*`` divided by
    ``scale`` (``max_i G_ii``): dimensionless, and for MGDA ``||d - d*||^2 <= residual * scale``
    (``d = J^T w``, ``d*`` the unique min-norm point): it bounds the error of the update itself.

    Outside the reference torch loop below (see :func:`_solver_backend`), on CPU the loop runs
    in C++ (``_C.pairwise_fw_cpu``: this algorithm in double precision) and on CUDA in one
    Triton program (:func:`gradops._triton_solvers.pairwise_fw_triton`), both stopping once
    converged.
    """
    backend = _solver_backend(G)
    if backend != "torch":
        fn = _C.pairwise_fw_cpu if backend == "cpp" else _triton_solvers.pairwise_fw_triton
        w, converged, its, gap = fn(G, b, scale, k, delta2, max_iter, float(tol), _tiny(G))
        return w, SolverStatus(converged, its, gap)
    T = G.shape[0]
    dt, dev = G.dtype, G.device
    idx = torch.arange(T, device=dev)
    tiny = _tiny(G)
    w = torch.full((T,), 1.0 / T, dtype=dt, device=dev)
    its = torch.zeros((), dtype=torch.int64, device=dev)
    inf = torch.full((), math.inf, dtype=dt, device=dev)

    def grad_of(w, Gw):
        if b is None:
            return 2.0 * Gw
        return b + k * Gw / torch.sqrt(torch.clamp(w @ Gw, min=0.0) + delta2)

    def gap_of(w, Gw):
        gr = grad_of(w, Gw)
        return gr, (gr @ w - gr.min()) / scale

    for _ in range(max_iter):
        Gw = G @ w                           # fresh each step: the gap stays a true certificate
        gr, gap = gap_of(w, Gw)
        done = gap <= tol
        if _stop_early(done, early_exit):
            break
        s = torch.argmin(gr)
        v = torch.argmax(torch.where(w > 0, gr, -inf))
        delta = (idx == s).to(dt) - (idx == v).to(dt)
        wv = (w * (idx == v).to(dt)).sum()
        Gd = G @ delta
        A = delta @ Gd                       # curvature d^T G d >= 0
        B = w @ Gd                           # (G w)_s - (G w)_v
        if b is None:                        # quadratic: gamma* = -B / A
            gamma = -B / torch.clamp(A, min=tiny)
        else:                                # a gamma + k sqrt(A gamma^2 + 2 B gamma + C)
            a = b @ delta
            C = torch.clamp(w @ Gw, min=0.0) + delta2
            Ac = torch.clamp(A, min=tiny)
            r = (a / torch.clamp(k, min=tiny)) ** 2
            Dq = torch.clamp(C - B * B / Ac, min=0.0)
            interior = (A > r) & (k > 0)
            u = torch.sqrt(r * Dq / torch.clamp(Ac * (A - r), min=tiny))
            u = torch.where(a > 0, -u, u)    # sign(u) = -sign(a) at the stationary point
            g_int = u - B / Ac
            g_mono = torch.where(a < 0, inf, torch.zeros_like(a))  # f monotone in gamma
            gamma = torch.where(interior, g_int, g_mono)
        gamma = torch.where(torch.isnan(gamma), torch.zeros_like(gamma), gamma)
        gamma = torch.minimum(torch.clamp(gamma, min=0.0), wv)
        w_new = w + gamma * delta
        w_new = torch.where(idx == v, torch.clamp(w_new, min=0.0), w_new)  # exact drop
        w = torch.where(done, w, w_new)
        its = its + (~done).to(torch.int64)
    Gw = G @ w
    _, gap = gap_of(w, Gw)
    return w, SolverStatus(gap <= tol, its, gap)


def _nash_newton(Gn: torch.Tensor, max_iter: int, tol: float, early_exit: bool | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nash-MTL's damped Newton loop on the normalised Gram ``Gn`` (see :func:`nashmtl`):
    ``(a, iterations, residual)``, ``residual = max_i |a_i (Gn a)_i - 1|``.

    Outside the reference torch loop (see :func:`_solver_backend`), it runs in C++ on CPU
    (``_C.nash_newton_cpu``, double precision) and in one Triton program on CUDA
    (:func:`gradops._triton_solvers.nash_newton_triton`), both stopping once converged.
    """
    T = Gn.shape[0]
    dt, dev = Gn.dtype, Gn.device
    eps, tiny = _eps(Gn), _tiny(Gn)
    jitter = 16 * eps
    backend = _solver_backend(Gn)
    if backend != "torch":
        fn = _C.nash_newton_cpu if backend == "cpp" else _triton_solvers.nash_newton_triton
        a, _, its, res = fn(Gn, max_iter, float(tol), tiny, jitter)
        return a, its, res
    eye = torch.eye(T, dtype=dt, device=dev)

    def residual(a, Ga):
        return (a * Ga - 1.0).abs().max()

    a = 1.0 / torch.sqrt(torch.clamp(Gn.diagonal(), min=tiny))
    q = a @ Gn @ a
    a = a * torch.sqrt(T / torch.clamp(q, min=tiny))
    its = torch.zeros((), dtype=torch.int64, device=dev)
    for _ in range(max_iter):
        Ga = Gn @ a
        done = residual(a, Ga) <= tol
        if _stop_early(done, early_exit):
            break
        grad = Ga - 1.0 / a
        H = Gn + torch.diag(1.0 / (a * a)) + jitter * eye
        L, _info = torch.linalg.cholesky_ex(H)
        step = torch.cholesky_solve(-grad[:, None], L)[:, 0]
        lam = torch.sqrt(torch.clamp(-(grad @ step), min=0.0))
        t = torch.where(lam < 0.25, torch.ones_like(lam), 1.0 / (1.0 + lam))
        a_new = a + t * step
        a_new = torch.where(a_new > 0, a_new, 0.5 * a)       # rounding guard (theory: > 0)
        a = torch.where(done, a, a_new)
        its = its + (~done).to(torch.int64)
    return a, its, residual(a, Gn @ a)
