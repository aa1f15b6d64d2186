"""The iterative solvers' loops (an exact active-set method for MGDA and CAGrad, damped Newton
for Nash-MTL) and where they run: the torch loops here are the reference (and serve
``torch.compile``, fake tensors and a ``G`` that requires grad); in eager mode the same
algorithms run in C++ on CPU tensors (``csrc/weighting_cpu.cpp``) and in one Triton program per
solve on CUDA tensors (:mod:`gradops.weighting._triton_solvers`)."""
from __future__ import annotations

import math

import torch

from .._backend import _C, register_op
from . import _triton_solvers
from ._common import SolverStatus, solver_backend, _eps, _stop_early, _tiny
from ._solver_tolerances import _FLOOR, _JITTER, _MARGIN

_F64_TINY = torch.finfo(torch.float64).tiny

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
    return solver_backend("weighting_solvers", G)


def _simplex_qp(G: torch.Tensor, max_iter: int, tol: float, scale: torch.Tensor,
                b: torch.Tensor | None = None, k: torch.Tensor | None = None,
                delta2: torch.Tensor | None = None, early_exit: bool | None = None
                ) -> tuple[torch.Tensor, SolverStatus]:
    """MGDA's and CAGrad's problems on the simplex, solved exactly by an active-set method, fixed
    budget, all on device.

    ``b is None`` (MGDA): ``min_{w in simplex} w^T G w``, by Wolfe's min-norm-point algorithm
    (Wolfe, "Finding the nearest point in a polytope", Math. Programming 11, 1976): a corral of
    affinely independent tasks, the affine min-norm point of the corral from a small linear
    solve, a ratio test that drops a task when that point leaves the simplex, and the task of
    smallest ``(G w)_i`` added once it is reached. Finite termination; the answer is exact to
    rounding once the optimal corral is found.

    Otherwise (CAGrad): ``min_{w in simplex} F(w) = b^T w + k sqrt(w^T G w + delta2)``. For
    ``t > 0`` let ``w(t)`` minimise the quadratic ``1/2 w^T G w + t b^T w`` (the same Wolfe
    iteration with a linear term); ``w(t)`` minimises ``F`` exactly when
    ``w(t)^T G w(t) + delta2 = k^2 t^2`` (their gradients are then parallel). On a corral ``S``,
    ``w(t) = alpha + t beta`` (``alpha`` the affine min-norm point, ``beta`` from the same
    factorisation, ``alpha^T G beta = 0``), so that equation has the closed-form root
    ``t_S = sqrt((alpha^T G alpha + delta2) / (k^2 - beta^T G beta))``: an outer step takes
    ``t = t_S`` (Newton-like, exact once ``S`` is the optimal corral) when it lies inside the
    bracket ``[t_lo, t_hi]`` kept from the sign of that equation's residual, else bisects.
    Inner and outer steps share one loop and one budget.

    Every quantity is computed in float64 on ``G / scale`` (``scale = max_i G_ii``). The residual
    is the Frank-Wolfe duality gap of ``w^T G w`` (MGDA) or of ``F`` (CAGrad) divided by
    ``scale``: ``f(w) - f* <= residual * scale``, and for MGDA ``||d - d*||^2 <= residual *
    scale``. The iterate is frozen once that gap is at float64's rounding level (or below
    ``tol`` if smaller); ``converged`` = ``residual <= tol``.

    Outside the reference torch loop below (see :func:`_solver_backend`), on CPU the loop runs
    in C++ (``_C.simplex_qp_cpu``) and on CUDA in one Triton program
    (:func:`gradops._triton_solvers.simplex_qp_triton`), both stopping once frozen.
    """
    backend = _solver_backend(G)
    if backend != "torch":
        fn = _C.simplex_qp_cpu if backend == "cpp" else _triton_solvers.simplex_qp_triton
        w, converged, its, gap = fn(G, b, scale, k, delta2, max_iter, float(tol), _tiny(G))
        return w, SolverStatus(converged, its, gap)
    out_dt, dev = G.dtype, G.device
    dt = torch.float64
    T = G.shape[0]
    idx = torch.arange(T, device=dev)
    inf = torch.full((), math.inf, dtype=dt, device=dev)
    zero = torch.zeros((), dtype=dt, device=dev)
    sc = scale.to(dt)
    Gs = G.to(dt) / sc
    cagrad = b is not None
    if cagrad:
        bs = b.to(dt) / sc
        k2 = k.to(dt) ** 2 / sc
        d2 = delta2.to(dt) / sc
        kk = torch.sqrt(k2)
        t_hi = 2.0 * torch.sqrt(1.0 + d2) / torch.clamp(kk, min=_F64_TINY)
    else:
        bs = torch.zeros(T, dtype=dt, device=dev)
        k2 = d2 = kk = t_hi = zero
    jitter = _JITTER * T

    def gaps(w, Gw, t):
        gr = Gw + t * bs                                   # grad of 1/2 w^T G w + t b^T w
        gq = gr @ w - gr.min()
        if not cagrad:
            return gr, gq, 2.0 * gq
        rho = torch.sqrt(torch.clamp(w @ Gw + d2, min=_F64_TINY))   # ||g_w||, smoothed
        grf = bs + kk * Gw / rho                           # grad F
        return gr, gq, grf @ w - grf.min()

    w = (idx == torch.argmin(Gs.diagonal())).to(dt)       # a single task: a corral
    false = torch.zeros((), dtype=torch.bool, device=dev)
    ok = ~false                                           # w: affine minimiser on its support
    stalled = false.clone()                               # a corral could not be extended
    settled = false.clone()                               # CAGrad: t is its own Newton step
    t = zero.clone()
    t_lo = zero.clone()
    freeze = torch.clamp(_FLOOR * (1.0 + kk), max=tol)
    fin = torch.isfinite(Gs).all() & torch.isfinite(bs).all() & torch.isfinite(k2 + d2)
    its = torch.zeros((), dtype=torch.int64, device=dev)
    for _ in range(max_iter):
        Gw = Gs @ w
        gr, gq, gap = gaps(w, Gw, t)
        es = idx == torch.argmin(gr)                       # one-hot: no data-dependent index
        gw = gr @ w
        can_add = ((torch.where(es, gr, 0.0).sum() < gw - _MARGIN * (1.0 + t))
                   & (torch.where(es, w, 0.0).sum() <= 0) & ~stalled)
        if cagrad:
            inner_done = ok & ~can_add
            done = ((gap <= freeze) | settled) & fin
        else:
            inner_done = false
            done = ((gap <= freeze) | (ok & ~can_add)) & fin
        if _stop_early(done, early_exit):
            break
        add = ok & can_add & ~inner_done
        S = (w > 0) | (add & es)
        p = torch.argmax(w)
        Sp = S & (idx != p)
        ep = (idx == p).to(dt)
        Gp = Gs @ ep
        Gpp = Gp @ ep
        H = Gs - Gp[:, None] - Gp[None, :] + Gpp
        H = torch.where(Sp[:, None] & Sp[None, :], H, 0.0) + torch.diag(
            torch.where(Sp, jitter, 1.0).to(dt))
        rhs = torch.stack([torch.where(Sp, Gpp - Gp, 0.0), torch.where(Sp, bs @ ep - bs, 0.0)], 1)
        L, info = torch.linalg.cholesky_ex(H)
        Y = torch.cholesky_solve(rhs, L)
        fail = (info != 0) | ~torch.isfinite(Y).all()
        alpha = Y[:, 0] + ep * (1.0 - Y[:, 0].sum())
        beta = Y[:, 1] - ep * Y[:, 1].sum()
        # inner step: to the affine minimiser at t, or (ratio test) to where a task drops out
        a = alpha + t * beta
        neg = S & (a < 0)
        ratio = torch.where(neg, w / torch.clamp(w - a, min=_F64_TINY), inf)
        theta = ratio.min()
        full = ~neg.any()
        w_part = torch.clamp(w + theta * (a - w), min=0.0) * (idx != torch.argmin(ratio)).to(dt)
        w_in = torch.where(full, torch.clamp(a, min=0.0) * S.to(dt), w_part)
        w_in = torch.where(fail, w, w_in / w_in.sum())
        ok_in = torch.where(fail, ok, full)
        stalled_in = stalled | fail
        if cagrad:                                         # outer step: a new t
            psi_pos = w @ Gw + d2 > k2 * t * t
            t_lo_new = torch.where(psi_pos, t, t_lo)
            t_hi_new = torch.where(psi_pos, t_hi, t)
            den = k2 - beta @ Gs @ beta
            tS = torch.sqrt(torch.clamp(alpha @ Gs @ alpha + d2, min=_F64_TINY)
                            / torch.clamp(den, min=_F64_TINY))
            newton = (den > 0) & (tS >= t_lo_new) & (tS <= t_hi_new) & ~fail
            t_new = torch.where(newton, tS, 0.5 * (t_lo_new + t_hi_new))
            outer = inner_done & ~done
            settled = outer & (torch.abs(t_new - t) <= _MARGIN * t)
            t_lo = torch.where(outer, t_lo_new, t_lo)
            t_hi = torch.where(outer, t_hi_new, t_hi)
            t = torch.where(outer, t_new, t)
            w_new = torch.where(inner_done, w, w_in)
            ok_new = torch.where(inner_done, false, ok_in)
            stalled_new = torch.where(inner_done, false, stalled_in)
        else:
            w_new, ok_new, stalled_new = w_in, ok_in, stalled_in
        w = torch.where(done, w, w_new)
        ok = torch.where(done, ok, ok_new)
        stalled = torch.where(done, stalled, stalled_new)
        its = its + (~done).to(torch.int64)
    Gw = Gs @ w
    _, _, gap = gaps(w, Gw, t)
    gap = gap.to(out_dt)
    return w.to(out_dt), SolverStatus(gap <= tol, its, gap)


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
