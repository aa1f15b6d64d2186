"""Nash-MTL (Navon et al. 2022)."""
from __future__ import annotations

import math

import torch

from ._common import SolverStatus, _check_iter, _eps, _poison, _prep, _ret, _tiny
from ._mgda import mgda
from ._solvers import _nash_newton
from dataclasses import dataclass

from ._registry import GramMethod, Options, StepContext, register


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
    weight 0 and the others are solved without them.

    No solution (Pareto-stationary ``J``): when ``0`` is in the convex hull of the non-zero
    gradients (typically when ``T > P``), no ``d`` has ``g_i . d > 0`` for every task (Gordan's
    theorem), ``F`` is unbounded below and the Newton iterate runs off to infinity (before this
    check: weights of 1e19, or NaN). This is detected on the device, without a host read: the
    squared distance of the hull to 0, ``delta^2 = min_{w in simplex} w^T Gn w``, is bounded
    above by two points of the simplex, the normalised Newton iterate and MGDA's min-norm point
    (:func:`gradops.weighting.mgda`, its default budget), and ``delta^2 <= T eps max_i Gn_ii``
    (0 to the working precision) counts as no solution, as does a non-finite Newton iterate from
    a finite ``G``. The answer is then ``w = 0``, a zero update: the bargaining game's
    disagreement point, which the paper's solution must improve on for every player, is
    ``d = 0``, and no ``d`` improves every task (MGDA's answer at such a point is ``d = 0``
    too). The status says so: ``converged`` False and ``residual = inf`` (the documented flag;
    a NaN/Inf ``G`` gives NaN instead), counted by ``MTLOptimizer`` in ``opt.stats()``
    (``nonconverged`` and ``no_solution``). Near such a point (small ``delta > 0``) the solution
    exists but ``alpha`` grows as ``1 / delta``; the clip then bounds ``d``, and an unconverged
    solve returns the clipped last iterate.

    Args:
        G: the Gram ``J J^T`` ``[T, T]`` (``T >= 1``, floating point, any device).
        max_norm: the bound on ``||d||`` (>= 0; 0 disables the clip).
        max_iter: the solver's iteration budget (a Python int >= 0: no host synchronisation).
        tol: the residual at which the iterate counts as converged and is frozen (>= 0).
        early_exit: stop the loop once converged (None: on CPU tensors in eager mode only;
            the result is the same either way).
        return_status: also return the :class:`SolverStatus`.

    Returns:
        ``alpha [T]`` (the update is ``d = alpha^T J``), or ``(alpha, status)`` with
        ``return_status``.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not a square ``[T, T]``, a negative ``max_norm``, or a bad
            ``max_iter`` / ``tol``.
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
    Gact = torch.where(act2, G / m, torch.zeros_like(G))        # the active tasks, normalised
    Gn = Gact + torch.diag((~active).to(dt))
    a, its, res = _nash_newton(Gn, max_iter, tol, early_exit)
    none = _no_solution(Gact, active, a, early_exit)
    alpha = torch.where(active & ~none, a / torch.sqrt(m), torch.zeros_like(a))
    if max_norm > 0:
        dnorm = torch.sqrt(torch.clamp(alpha @ G @ alpha, min=0.0))
        alpha = alpha * torch.clamp(max_norm / torch.clamp(dnorm, min=tiny), max=1.0)
    finite = torch.isfinite(G).all()
    alpha = alpha + _poison(G)
    res = torch.where(none & finite, torch.full_like(res, math.inf), res)
    status = SolverStatus((res <= tol) & torch.isfinite(alpha).all(), its, res)
    return _ret(alpha, status, return_status)


def _no_solution(Gact: torch.Tensor, active: torch.Tensor, a: torch.Tensor,
                 early_exit: bool | None) -> torch.Tensor:
    """Whether ``0`` is (to the working precision) in the convex hull of the active gradients,
    i.e. ``delta^2 = min_{w in simplex} w^T Gact w <= T eps max_i Gact_ii`` (a 0-dim bool on the
    device; no host read), or the Newton iterate diverged (non-finite ``a``).

    ``delta^2`` is the value at MGDA's min-norm point (:func:`gradops.weighting.mgda`, an exact
    active-set solve in float64), with the inactive tasks kept out of it by a large diagonal."""
    T = Gact.shape[0]
    zero = torch.zeros_like(a)
    dn = torch.where(active, Gact.diagonal(), zero)
    thr = T * _eps(Gact) * dn.max()

    big = torch.clamp(T * dn.max(), min=1.0)
    Gm = Gact + torch.diag(torch.where(active, zero, big.expand_as(zero)))
    wm = torch.where(active, mgda(Gm, normalization="none", early_exit=early_exit), zero)
    cert = wm @ Gact @ wm
    diverged = ~torch.isfinite(torch.where(active, a, zero)).all()
    return (active.sum() >= 2) & ((cert <= thr) | diverged)


@dataclass(frozen=True)
class NashMTLOptions(Options):
    max_norm: float = 1.0           # clip ||d|| to this (0: no clip)
    max_iter: int = 20              # the solver's iteration budget (a Python int: no host sync)
    tol: float = 1e-5               # the tolerance that freezes a converged iterate on the device
    early_exit: bool | None = None  # CPU eager: stop once converged (None: automatic; same result)

    def check(self) -> None:
        self.check_nonnegative("max_iter", "tol", "max_norm")


@register
class NashMTL(GramMethod):
    """The Nash bargaining solution (:func:`nashmtl`)."""

    name = "nashmtl"
    display = "Nash-MTL"
    paper = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022"
    Options = NashMTLOptions
    scale_invariant = False     # alpha -> alpha / s under J -> sJ
    iterative = True
    order = 70

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return nashmtl(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import NashMTL as TorchJDNashMTL
        return TorchJDNashMTL(n_tasks=T)
