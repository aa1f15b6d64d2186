"""PCD, Priority-Constrained Descent ("Not All Objectives Are Born Equal: Priority-Constrained
Descent for Hierarchical Multi-Objective Optimization", TMLR 2026, arXiv:2606.29521; TorchJD
0.18's ``PCD``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._common import SolverStatus, _check_iter, _prep, _stop_early
from ._mgda import mgda
from ._registry import GramMethod, Options, StepContext, register

__all__ = ["PCD", "PCDOptions", "pcd_qp"]


def pcd_qp(Gn: torch.Tensor, tau: float, max_iter: int = 50, tol: float = 1e-12, *,
           dependence_tol: float = 1e-9, early_exit: bool | None = None):
    """PCD's quadratic program on the Gram ``Gn`` of the (normalised) gradients, row 0 the
    primary one: ``min_d 1/2 ||d - g_1||^2`` s.t. ``g_j . d >= tau ||g_j||^2`` (``j >= 2``),
    through its dual, the non-negative QP ``min_{mu >= 0} 1/2 mu^T Q mu - b^T mu`` with
    ``Q = Gn[1:, 1:]``, ``b_j = tau Gn_jj - Gn_j1`` and ``d = g_1 + sum_j mu_j g_j``.

    Solver: Mehrotra's predictor-corrector primal-dual interior-point method (Nocedal &
    Wright, Numerical Optimization, Alg. 16.4 for the bound-constrained QP) in float64, on ``Q``
    and ``b`` divided by ``max_j Q_jj``, from ``mu = s = 1``, Cholesky (``cholesky_ex``) of
    ``Q + diag(s / mu)`` plus a ``16 eps`` jitter, steps cut to 0.99 of the boundary, at most
    ``max_iter`` iterations, frozen once converged; no host read. Residual = ``max(max_j |Q mu
    - b - s|, max_j mu_j s_j) / (1 + max_j |b_j|)`` (dimensionless); ``converged`` when
    ``<= tol``. (TorchJD solves the same program exactly with Goldfarb & Idnani's active-set
    method on the host; the minimiser is the same.)

    Infeasible constraints (``m >= 3``, e.g. two anti-parallel secondary gradients): by Farkas'
    lemma, with ``tau > 0`` the constraints are infeasible iff ``0`` is in the convex hull of the
    non-zero secondary gradients, i.e. ``delta^2 = min_{u in simplex} u^T Q u = 0`` (the dual is
    then unbounded). ``delta^2`` comes from MGDA's exact min-norm solve
    (:func:`gradops.weighting.mgda`, on the device); ``delta^2 <= dependence_tol max_j Q_jj``
    (TorchJD's ``max(1e-9, 10 eps)`` of the input dtype) counts as infeasible, and the result is
    PCD's rule for that case, the constraints dropped (``mu = 0``), flagged by ``infeasible``.

    Returns ``(w, converged, iterations, residual, infeasible)``, ``w = [1, mu]``.
    """
    T, dt, dev = Gn.shape[0], Gn.dtype, Gn.device
    one = torch.ones(1, dtype=dt, device=dev)
    its = torch.zeros((), dtype=torch.int64, device=dev)
    if T == 1:
        z = torch.zeros((), dtype=dt, device=dev)
        return one, torch.ones((), dtype=torch.bool, device=dev), its, z, z.bool()
    n = T - 1
    Q = Gn[1:, 1:]
    b = tau * Q.diagonal() - Gn[1:, 0]
    sc = torch.clamp(Q.diagonal().max(), min=1e-300)
    Q, b = Q / sc, b / sc
    bmax = 1.0 + b.abs().max()
    eye = torch.eye(n, dtype=dt, device=dev)
    jitter = 16 * torch.finfo(dt).eps
    mu = torch.ones(n, dtype=dt, device=dev)
    s = torch.ones(n, dtype=dt, device=dev)

    def residual(mu, s):
        rd = Q @ mu - b - s
        return torch.maximum(rd.abs().max(), (mu * s).max()) / bmax

    def max_step(x, dx):
        r = torch.where(dx < 0, -x / torch.where(dx < 0, dx, -torch.ones_like(dx)),
                        torch.full_like(x, math.inf))
        return r.min()

    for _ in range(max_iter):
        done = residual(mu, s) <= tol
        if _stop_early(done, early_exit):
            break
        rd = Q @ mu - b - s
        gap = (mu * s).sum() / n
        L, _info = torch.linalg.cholesky_ex(Q + torch.diag(s / mu) + jitter * eye)

        def direction(rc):
            dmu = torch.cholesky_solve((-rd + rc / mu)[:, None], L)[:, 0]
            return dmu, (rc - s * dmu) / mu

        dmu_a, ds_a = direction(-mu * s)                              # predictor (affine)
        a_aff = torch.clamp(torch.minimum(max_step(mu, dmu_a), max_step(s, ds_a)), max=1.0)
        gap_aff = ((mu + a_aff * dmu_a) * (s + a_aff * ds_a)).sum() / n
        sigma = (gap_aff / torch.clamp(gap, min=1e-300)) ** 3
        dmu, ds = direction(-mu * s + sigma * gap - dmu_a * ds_a)     # corrector
        a = torch.clamp(0.99 * torch.minimum(max_step(mu, dmu), max_step(s, ds)), max=1.0)
        mu = torch.where(done, mu, mu + a * dmu)
        s = torch.where(done, s, s + a * ds)
        its = its + (~done).to(torch.int64)
    res = residual(mu, s)
    converged = res <= tol
    nz = Q.diagonal() > 0
    big = torch.full_like(b, 2.0 * n)                  # keeps zero gradients out of the hull
    Qh = Q + torch.diag(torch.where(nz, torch.zeros_like(b), big))
    u = mgda(Qh, normalization="none", early_exit=early_exit)
    delta2 = u @ Qh @ u
    infeasible = nz.any() & (delta2 <= dependence_tol)
    if tau == 0:                                       # d = 0 is feasible
        infeasible = torch.zeros_like(infeasible)
    mu = torch.where(infeasible, torch.zeros_like(mu), torch.clamp(mu, min=0.0))
    return torch.cat([one, mu]), converged, its, res, infeasible


@dataclass(frozen=True)
class PCDOptions(Options):
    tau: float = 0.02               # the fraction of normalised progress each secondary keeps
    beta: float = 0.999             # decay of the EMA of the squared gradient norms
    eps: float = 1e-8               # added to the EMA before its inverse square root
    max_iter: int = 50              # the solver's iteration budget (a Python int: no host sync)
    tol: float = 1e-12              # the tolerance that freezes a converged iterate on the device
    early_exit: bool | None = None  # CPU eager: stop once converged (None: automatic; same result)

    def check(self) -> None:
        if not 0 <= self.tau <= 1:
            self.fail("tau", f"must be in [0, 1], got {self.tau}")
        if not 0 <= self.beta < 1:
            self.fail("beta", f"must be in [0, 1), got {self.beta}")
        if not self.eps >= 0:
            self.fail("eps", f"must be >= 0, got {self.eps}")
        if self.max_iter < 0:
            self.fail("max_iter", f"must be >= 0, got {self.max_iter}")
        if not self.tol >= 0:
            self.fail("tol", f"must be >= 0, got {self.tol}")


@register
class PCD(GramMethod):
    """Priority-Constrained Descent (TMLR 2026; TorchJD 0.18's ``PCDWeighting``, whose
    docstring and reference implementation github.com/DaraVaram/priority-constrained-descent
    this follows): task 0 is the **primary** objective. With ``s_i = 1 / sqrt(v^_i + eps)``,
    ``v^`` the bias-corrected EMA (decay ``beta``) of ``||g_i||^2`` over the steps, and the
    normalised gradients ``g~_i = s_i g_i``,

        ``d~ = argmin_d 1/2 ||d - g~_1||^2``  s.t.  ``g~_j . d >= tau ||g~_j||^2``, ``j >= 2``

    (:func:`pcd_qp`), then ``d = d~ ||g_1|| / ||d~||``: the weights are ``w_i = mu_i s_i
    ||g_1|| / ||d~||`` (``mu_1 = 1``). ``g_1 = 0`` gives ``w = 0``; ``||d~||^2`` at or below
    ``10 eps (sum_i |mu_i| ||g~_i||)^2`` (zero to rounding) gives ``w = 0``; infeasible
    constraints (``0`` in the hull of the secondary gradients, see :func:`pcd_qp`) give
    ``d = g_1`` with the status ``converged`` False and ``residual = inf`` (counted by
    ``MTLOptimizer`` as no solution), as TorchJD's rule (which says nothing).

    Scale convention = TorchJD's: ``||d|| = ||g_1||`` (the primary gradient's norm, so its
    learning rate carries over); ``w`` is invariant to ``J -> sJ`` (up to ``eps``). Not
    symmetric in the tasks (``permutation_equivariant = False``): the order given to
    ``MTLOptimizer`` matters.
    Only a scalar ``tau`` (TorchJD also takes one per secondary objective).

    State (``state_dict``): the EMA ``[T]`` (float64) and the count of steps in it; a step whose
    Gram is non-finite returns NaN weights and leaves both as they were. Cost: the ``T x T``
    interior-point solve and an MGDA min-norm solve (the infeasibility test), nothing beyond
    the backward passes."""

    name = "pcd"
    display = "PCD"
    paper = ("Not All Objectives Are Born Equal: Priority-Constrained Descent for "
             "Hierarchical Multi-Objective Optimization, TMLR 2026 (arXiv:2606.29521)")
    Options = PCDOptions
    iterative = True
    permutation_equivariant = False   # task 0 is the primary objective

    def __init__(self, options: PCDOptions | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.ema: torch.Tensor | None = None
        self.count: torch.Tensor | None = None

    def weights(self, G: torch.Tensor, ctx: StepContext):
        G = _prep(G, "pcd")
        T, dt, dev = G.shape[0], G.dtype, G.device
        o = self.options
        _check_iter("pcd", o.max_iter, o.tol)
        Gd = G.double()
        finite = torch.isfinite(Gd).all()
        Gd = torch.where(finite, Gd, torch.zeros_like(Gd))
        ema, count = self.ema, self.count
        if ema is None or ema.shape != (T,):
            ema = torch.zeros(T, dtype=torch.float64, device=dev)
            count = torch.zeros((), dtype=torch.int64, device=dev)
        ema, count = ema.to(dev), count.to(dev)
        sq = Gd.diagonal()
        new_ema = o.beta * ema + (1.0 - o.beta) * sq
        new_count = count + 1
        self.ema = torch.where(finite, new_ema, ema)
        self.count = torch.where(finite, new_count, count)
        deb = new_ema / (1.0 - torch.pow(torch.full((), o.beta, dtype=torch.float64,
                                                    device=dev), new_count))
        den = torch.sqrt(deb + o.eps)
        scales = torch.where(den > 0, 1.0 / torch.where(den > 0, den, torch.ones_like(den)),
                             torch.zeros_like(den))
        Gn = Gd * scales[:, None] * scales[None, :]
        dep = max(1e-9, 10.0 * torch.finfo(dt).eps)
        w, conv, its, res, infeasible = pcd_qp(Gn, o.tau, o.max_iter, o.tol, dependence_tol=dep,
                                               early_exit=o.early_exit)
        dn2 = w @ Gn @ w
        magnitude = (w.abs() @ torch.sqrt(torch.clamp(Gn.diagonal(), min=0.0))) ** 2
        precision = 10.0 * torch.finfo(dt).eps
        keep = (sq[0] > 0) & (dn2 > precision * magnitude)
        out = torch.where(keep, w * scales * torch.sqrt(sq[0] / torch.where(keep, dn2,
                                                                             torch.ones_like(dn2))),
                          torch.zeros_like(w))
        nan = torch.full((), math.nan, dtype=torch.float64, device=dev)
        out = torch.where(finite, out, nan).to(dt)
        # the primary gradient is 0: nothing to solve, d = 0 (converged)
        trivial = sq[0] <= 0
        res = torch.where(infeasible, torch.full_like(res, math.inf),
                          torch.where(trivial, torch.zeros_like(res), res))
        res = torch.where(finite, res, nan).to(dt)
        conv = (conv | trivial) & ~infeasible & finite
        return out, SolverStatus(conv, its, res)

    def torchjd(self, T: int):
        from torchjd.aggregation import PCD as TorchJDPCD
        return TorchJDPCD(tau=self.options.tau, beta=self.options.beta, eps=self.options.eps)

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"pcd_ema": self.ema.clone(), "pcd_count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        e = state.get("pcd_ema")
        self.ema = None if e is None else e.clone()
        c = state.get("pcd_count")
        self.count = None if c is None else c.clone()
