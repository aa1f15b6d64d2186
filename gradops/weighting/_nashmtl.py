"""Nash-MTL (Navon et al. 2022)."""
from __future__ import annotations


import torch

from ._common import SolverStatus, _check_iter, _eps, _poison, _prep, _ret, _tiny
from ._solvers import _nash_newton


def nashmtl(G: torch.Tensor, max_norm: float = 1.0, max_iter: int = 20, tol: float = 1e-5, *,
            early_exit: bool | None = None, return_status: bool = False):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Alg. 1
    and its optimality condition): the positive ``alpha`` with ``G alpha = 1 / alpha``
    (elementwise), the Nash bargaining solution; ``d = sum_i alpha_i g_i``, then clipped to
    ``||d|| <= max_norm`` (``||d|| = sqrt(alpha^T G alpha)``; ``max_norm = 0`` disables) with the
    clip folded into the weights, as LibMTL's and the authors' ``clip_grad_norm_(shared,
    max_norm)``.

    Convention: the equation is solved for the **raw** ``G``. The authors' code (and LibMTL's,
    TorchJD's copy) divides ``G`` by its Frobenius norm ``nf`` for the solver but keeps ``nf`` in
    the constraint ``alpha_i nf (G/nf alpha)_i >= 1``, i.e. ``alpha_i (G alpha)_i >= 1``, so its
    fixed point is this one; it stops its CCP after 20 cvxpy solves, we solve to ``tol``. Here
    ``G`` is divided by ``mean_i G_ii`` internally for conditioning only (``alpha(G/m) =
    sqrt(m) alpha(G)``). At the solution ``||d||^2 = alpha^T G alpha = T``: ``alpha`` scales as
    ``1/s`` under ``J -> sJ`` and ``d`` is invariant (before the clip, which with the default
    ``max_norm = 1`` and ``T >= 2`` is always active: ``||d|| = 1``).

    Solver: Newton's method on the strictly convex ``F(alpha) = 1/2 alpha^T G alpha - sum log
    alpha_i`` (its stationary point is the solution), damped as for a self-concordant function
    (step ``1/(1 + lambda)`` while the Newton decrement ``lambda >= 1/4``; this keeps ``alpha >
    0``), Cholesky (``cholesky_ex``, never checked on the host) on ``G + diag(1/alpha^2)`` plus
    a ``16 eps`` relative jitter (changes the step, not the fixed point), from
    ``alpha_i = c / n_i``, ``max_iter`` iterations. Residual = ``max_i |alpha_i (G alpha)_i - 1|``
    (dimensionless);
    ``converged`` when ``<= tol``. Tasks with a zero gradient (``G_ii <= eps^2 max G_ii``) get
    weight 0 and the others are solved without them. When ``0`` is in the convex hull of the
    non-zero
    gradients (typically when ``T > P``), ``F`` is unbounded below and there is no solution: the
    status then says not converged and ``w`` is the last iterate (clipped).
    """
    G = _prep(G, "nashmtl")
    _check_iter("nashmtl", max_iter, tol)
    if not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"gradops.weighting.nashmtl: max_norm must be a float >= 0, "
                         f"got {max_norm!r}")
    dt = G.dtype
    eps, tiny = _eps(G), _tiny(G)
    diag = torch.clamp(G.diagonal(), min=0.0)
    dmax = diag.max()
    active = diag > eps * eps * dmax
    m = torch.clamp(torch.where(active, diag, torch.zeros_like(diag)).sum()
                    / torch.clamp(active.sum(), min=1), min=tiny)
    act2 = active[:, None] & active[None, :]
    Gn = torch.where(act2, G / m, torch.zeros_like(G)) + torch.diag((~active).to(dt))
    a, its, res = _nash_newton(Gn, max_iter, tol, early_exit)
    alpha = torch.where(active, a / torch.sqrt(m), torch.zeros_like(a))
    if max_norm > 0:
        dnorm = torch.sqrt(torch.clamp(alpha @ G @ alpha, min=0.0))
        alpha = alpha * torch.clamp(max_norm / torch.clamp(dnorm, min=tiny), max=1.0)
    alpha = alpha + _poison(G)
    status = SolverStatus((res <= tol) & torch.isfinite(alpha).all(), its, res)
    return _ret(alpha, status, return_status)
