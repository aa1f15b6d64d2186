"""The projection onto the dual cone of the task gradients, shared by UPGrad and DualProj
(Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv:2406.16232, 2024:
Eq. 3 and Proposition 1), solved from the Gram on its device with a fixed budget."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._backend import _C, register_op
from ._common import SolverStatus, solver_backend, _stop_early
from ._registry import Options
from ._solver_tolerances import _JITTER, _MARGIN

__all__ = ["DualConeOptions", "dual_cone_weights"]


@dataclass(frozen=True)
class DualConeOptions(Options):
    """The options of the methods solved by the dual-cone projection (UPGrad, DualProj)."""

    reg_eps: float = 1e-4           # ridge on G / tr(G) (TorchJD's reg_eps)
    max_iter: int = 250             # active-set steps (all rows together)
    tol: float = 1e-6               # on the KKT residual
    early_exit: bool | None = None  # CPU eager: stop once converged (None: automatic; same result)

    def check(self) -> None:
        self.check_nonnegative("reg_eps", "max_iter", "tol")

_F64_TINY = torch.finfo(torch.float64).tiny

register_op("dual_cone", ("cpp", "torch"))


def _dual_cone_backend(G: torch.Tensor) -> str:
    """Where :func:`dual_cone_weights` runs: ``"cpp"`` (``_C.dual_cone_cpu``,
    ``csrc/weighting_cpu.cpp``; CPU tensors, extension built) or ``"torch"`` (the reference loop
    below). Always torch under ``torch.compile`` and for fake tensors;
    :func:`gradops._backend.select_backend` decides otherwise (a forced ``"cpp"`` that cannot run
    the call raises, a forced backend the op lacks leaves the automatic choice). A ``G`` that
    requires grad (grad mode on) keeps the differentiable torch loop; forcing ``"cpp"`` for it
    raises."""
    return solver_backend("dual_cone", G)


def dual_cone_weights(G: torch.Tensor, U: torch.Tensor, reg_eps: float, max_iter: int,
                      tol: float, early_exit: bool | None = None
                      ) -> tuple[torch.Tensor, SolverStatus]:
    """For each row ``u`` of ``U [K, T]``, the weights ``v`` of the projection of ``J^T u`` onto
    the dual cone ``{x : J x >= 0}`` of the task gradients, ``pi_J(J^T u) = J^T v``.

    Proposition 1 of Quinton & Rey: ``v = argmin_{v >= u} v^T G v``. As TorchJD's
    ``QuadprogProjector`` does, ``G`` is first normalised by its trace and regularised,
    ``H = G / tr(G) + reg_eps I`` (``H`` is the Gram of ``[J / ||J||_F, sqrt(reg_eps) I]``, so
    ``reg_eps > 0`` makes it positive definite and the answer unique); the normalisation is
    relative, so ``v`` is invariant to ``J -> sJ``. TorchJD's absolute ``norm_eps`` (a Gram of
    trace below ``1e-4`` is replaced by 0, which returns ``v = u``) is not applied: a zero
    Gram gives ``v = u`` here too, a small one is solved like any other.

    Solver: with ``lam = v - u >= 0`` the problem is the bound-constrained QP
    ``min_{lam >= 0} 1/2 lam^T H lam + lam^T H u``, solved by the Lawson-Hanson active-set method
    (Lawson & Hanson, "Solving Least Squares Problems", 1974, Ch. 23, in Gram form), for the
    ``K`` rows at once: a passive set ``S``, the unconstrained minimiser on ``S`` from a masked
    Cholesky solve (float64), a ratio test that drops the first coordinate to reach 0 when that
    minimiser leaves the orthant, and, once it is inside, the coordinate of most negative
    gradient ``(H v)_j < -margin`` added. Finite termination; a row's iterate is frozen
    (``torch.where``) once no coordinate can be added, so the result does not depend on the
    budget left. At most ``max_iter`` steps, no host synchronisation (``_stop_early`` leaves the
    loop on CPU tensors in eager mode once every row is frozen).

    Status: residual = the KKT natural residual ``max |min(lam_i, (H v)_i / h)| / max|u|``
    (``h = max_i H_ii``; 0 at the exact solution, float64 rounding once solved) over the rows;
    ``converged`` when it is ``<= tol`` and ``G`` is finite; ``iterations`` the most steps a row
    took. Returns ``V [K, T]`` in ``G``'s dtype (NaN when ``G`` is not finite).

    Backends (:func:`_dual_cone_backend`, op ``dual_cone`` in :func:`gradops.info`): the torch
    loop here is the reference (``torch.compile``, fake tensors, CUDA, a ``G`` that requires
    grad); in eager mode on CPU tensors the same method runs in C++ (``_C.dual_cone_cpu``,
    double precision, one row at a time, each stopping once frozen: the same result as the
    full budget).
    """
    if _dual_cone_backend(G) == "cpp":
        V, converged, its, res = _C.dual_cone_cpu(G, U.to(G.dtype), float(reg_eps), max_iter,
                                                  float(tol))
        return V, SolverStatus(converged, its, res)
    out_dt, dev = G.dtype, G.device
    dt = torch.float64
    T = G.shape[0]
    K = U.shape[0]
    Gd = G.to(dt)
    fin = torch.isfinite(Gd).all()
    eye = torch.eye(T, dtype=dt, device=dev)
    tr = torch.clamp(Gd.diagonal().sum(), min=_F64_TINY)
    H = torch.where(fin, Gd / tr, torch.zeros_like(Gd)) + reg_eps * eye
    Ud = U.to(dt)
    ubar = torch.clamp(Ud.abs().amax(1), min=_F64_TINY)               # [K]
    h = torch.clamp(H.diagonal().max(), min=_F64_TINY)
    c = Ud @ H                                                          # [K, T], H symmetric
    idx = torch.arange(T, device=dev)
    inf = torch.full((), math.inf, dtype=dt, device=dev)
    jitter = _JITTER * T * h
    margin = (_MARGIN * h) * ubar                                       # [K]
    lam = torch.zeros(K, T, dtype=dt, device=dev)
    ok = torch.ones(K, dtype=torch.bool, device=dev)        # lam minimises on its support
    stalled = torch.zeros(K, dtype=torch.bool, device=dev)  # a solve failed: add nothing more
    its = torch.zeros(K, dtype=torch.int64, device=dev)
    for _ in range(max_iter):
        g = lam @ H + c                                                 # H v
        cand = (lam <= 0) & (g < -margin[:, None])
        j = torch.argmin(torch.where(cand, g, inf), dim=1)
        ej = idx[None, :] == j[:, None]
        can_add = cand.any(1) & ~stalled
        done = ok & ~can_add
        if _stop_early(done.all(), early_exit):
            break
        add = ok & can_add
        S = (lam > 0) | (add[:, None] & ej)
        Sf = S.to(dt)
        Hm = H * (Sf[:, :, None] * Sf[:, None, :])          # H on S x S, 0 elsewhere
        Hm.diagonal(dim1=1, dim2=2).add_(1.0 - Sf + jitter * Sf)   # 1 off S: z = 0 there
        L, info = torch.linalg.cholesky_ex(Hm)
        z = torch.cholesky_solve(torch.where(S, -c, 0.0)[:, :, None], L)[:, :, 0]
        fail = (info != 0) | ~torch.isfinite(z).all(1)
        neg = S & (z <= 0)
        full = ~neg.any(1)
        ratio = torch.where(neg, lam / torch.clamp(lam - z, min=_F64_TINY), inf)
        theta, drop = ratio.min(1)
        part = torch.clamp(lam + theta[:, None] * (z - lam), min=0.0)
        part = torch.where(S & (idx[None, :] != drop[:, None]), part, 0.0)
        lam_in = torch.where(full[:, None], torch.where(S, z, 0.0), part)
        lam_in = torch.where(fail[:, None], lam, lam_in)
        ok_in = torch.where(fail, ok, full)
        lam = torch.where(done[:, None], lam, lam_in)
        ok = torch.where(done, ok, ok_in)
        stalled = torch.where(done, stalled, stalled | fail)
        its = its + (~done).to(torch.int64)
    g = lam @ H + c
    res = (torch.minimum(lam, g / h).abs() / ubar[:, None]).amax()
    nan = torch.full((), math.nan, dtype=dt, device=dev)
    res = torch.where(fin, res, nan)
    V = Ud + lam + torch.where(fin, torch.zeros((), dtype=dt, device=dev), nan)
    status = SolverStatus(res <= tol, its.max(), res.to(out_dt))
    return V.to(out_dt), status
