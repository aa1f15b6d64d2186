"""FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import SolverStatus, _check_iter, _eps, _poison, _prep, _ret, _stop_early
from ._registry import GramMethod, Options, StepContext, register

__all__ = ["FairGrad", "FairGradOptions", "fairgrad"]

_STEPS = 24          # backtracking candidates t_max 2^-k, k < _STEPS (evaluated together)
_ARMIJO = 1e-4


def fairgrad(G: torch.Tensor, alpha: float = 1.0, max_iter: int = 50, tol: float = 1e-8, *,
             early_exit: bool | None = None, return_status: bool = False):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. 4
    and Alg. 1): the alpha-fair update ``d = sum_i w_i g_i`` with the positive ``w`` solving
    ``G w = w^(-1/alpha)`` (elementwise power), i.e. ``g_i . d = w_i^(-1/alpha)``.

    ``alpha = 0`` is linear scalarisation (their Sec. 3): the mean, ``w = 1/T`` (TorchJD's
    convention). ``alpha = 1`` is proportional fairness, ``G w = 1/w``: Nash-MTL's equation
    (:func:`gradops.weighting.nashmtl` with ``max_norm=0``); ``alpha -> inf`` tends to max-min
    fairness.

    Scale convention = the authors', LibMTL's (``FairGrad_alpha``, default 1.0) and TorchJD's
    ``FairGrad(alpha)``: ``w`` is applied to the raw gradients (the sum convention) and no clip
    is applied. Under ``J -> sJ``, ``w -> s^(-2 alpha/(1+alpha)) w`` and
    ``d -> s^((1-alpha)/(1+alpha)) d`` (``alpha = 1``: ``d`` is invariant); so the update's
    scale, and the learning rate, is the papers' one.

    Solver: the equation is the stationarity condition of the strictly convex (``G`` positive
    definite) ``F(w) = 1/2 w^T G w - sum_i phi(w_i)``, ``phi' = w^(-1/alpha)`` (``phi = log``
    at ``alpha = 1``). Newton's method on ``F`` in float64 (``G`` divided by ``m = mean_i
    G_ii`` for conditioning: ``w(G) = m^(-alpha/(1+alpha)) w(G/m)``), Cholesky
    (``cholesky_ex``, never checked on the host) of ``G + diag(phi''...)`` plus a ``16 eps``
    relative jitter, a step cut to 0.99 of the distance to ``w = 0``, and a backtracking
    (Armijo) line search whose 24 candidate steps are evaluated together on the device (no host
    branch), from ``w_i = (G_ii/m)^(-alpha/(1+alpha))`` (the diagonal solution); at most
    ``max_iter`` iterations, the iterate frozen once converged. The authors, LibMTL and TorchJD
    call ``scipy.optimize.least_squares`` on the host from ``w = 1/T``; the root is unique, so
    both find the same ``w``. Residual = ``max_i |w_i^(1/alpha) (G w)_i - 1|``
    (dimensionless); ``converged`` when ``<= tol``.

    Tasks with a zero gradient (``G_ii <= eps^2 max G_ii``, which would need an infinite weight)
    get weight 0 and the others are solved without them. When ``0`` is in the convex hull of the
    gradients (e.g. ``T > P``) no positive root exists (``F`` is unbounded below or has no
    minimiser): the iterate runs off and the status says not converged (no fallback). A NaN/Inf
    in ``G`` gives NaN weights.

    Cost: ``O(T^3)`` per Newton step on the ``T x T`` Gram, nothing beyond the backward passes.
    """
    G = _prep(G, "fairgrad")
    _check_iter("fairgrad", max_iter, tol)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha >= 0:
        raise ValueError(f"gradops.weighting.fairgrad: alpha must be a float >= 0, got {alpha!r}")
    T, dt, dev = G.shape[0], G.dtype, G.device
    if alpha == 0:
        w = torch.full((T,), 1.0 / T, dtype=dt, device=dev) + _poison(G)
        ok = torch.isfinite(w).all()
        status = SolverStatus(ok, torch.zeros((), dtype=torch.int64, device=dev),
                              torch.where(ok, torch.zeros((), dtype=dt, device=dev),
                                          torch.full((), float("nan"), dtype=dt, device=dev)))
        return _ret(w, status, return_status)
    eps = _eps(G)
    Gd = G.double()
    diag = torch.clamp(Gd.diagonal(), min=0.0)
    active = diag > eps * eps * diag.max()
    m = torch.clamp(torch.where(active, diag, torch.zeros_like(diag)).sum()
                    / torch.clamp(active.sum(), min=1), min=1e-300)
    act2 = active[:, None] & active[None, :]
    Gn = torch.where(act2, Gd / m, torch.zeros_like(Gd)) + torch.diag((~active).double())
    v, its, res = _fair_newton(Gn, float(alpha), max_iter, tol, early_exit)
    k = m ** (-alpha / (1.0 + alpha))
    w = torch.where(active, v * k, torch.zeros_like(v)).to(dt) + _poison(G)
    res = res.to(dt) + _poison(G)
    status = SolverStatus((res <= tol) & torch.isfinite(w).all(), its, res)
    return _ret(w, status, return_status)


def _fair_newton(Gn: torch.Tensor, alpha: float, max_iter: int, tol: float,
                 early_exit: bool | None):
    """Damped Newton on ``F(v) = 1/2 v^T Gn v - sum phi(v_i)`` (float64): ``(v, its, res)``."""
    T, dt, dev = Gn.shape[0], Gn.dtype, Gn.device
    p = 1.0 / alpha
    jitter = 16 * torch.finfo(dt).eps
    eye = torch.eye(T, dtype=dt, device=dev)
    ts = 0.5 ** torch.arange(_STEPS, dtype=dt, device=dev)

    def phi(v):
        return torch.log(v) if alpha == 1 else v ** (1.0 - p) / (1.0 - p)

    def objective(V):                                  # [K, T] -> [K]
        return 0.5 * ((V @ Gn) * V).sum(-1) - phi(V).sum(-1)

    def residual(v, Gv):
        return (v ** p * Gv - 1.0).abs().max()

    v = torch.clamp(Gn.diagonal(), min=1e-300) ** (-alpha / (1.0 + alpha))
    its = torch.zeros((), dtype=torch.int64, device=dev)
    for _ in range(max_iter):
        Gv = Gn @ v
        done = residual(v, Gv) <= tol
        if _stop_early(done, early_exit):
            break
        grad = Gv - v ** (-p)
        H = Gn + torch.diag(p * v ** (-p - 1.0)) + jitter * eye
        L, _info = torch.linalg.cholesky_ex(H)
        step = torch.cholesky_solve(-grad[:, None], L)[:, 0]
        ratio = torch.where(step < 0, -v / torch.where(step < 0, step, -torch.ones_like(step)),
                            torch.full_like(v, float("inf")))
        tmax = torch.clamp(0.99 * ratio.min(), max=1.0)
        t = tmax * ts                                   # [K] candidates, largest first
        V = v[None, :] + t[:, None] * step[None, :]
        slope = grad @ step                             # < 0 (H is positive definite)
        ok = objective(V) <= objective(v[None, :])[0] + _ARMIJO * t * slope
        first = torch.argmax(ok.to(torch.int8))         # the first that passes (else 0)
        first = torch.where(ok.any(), first, torch.full_like(first, _STEPS - 1))
        v_new = V[first]
        v_new = torch.where(v_new > 0, v_new, 0.5 * v)  # rounding guard
        v = torch.where(done, v, v_new)
        its = its + (~done).to(torch.int64)
    return v, its, residual(v, Gn @ v)


@dataclass(frozen=True)
class FairGradOptions(Options):
    alpha: float = 1.0              # the fairness exponent (their alpha; 0: mean, 1: Nash)
    max_iter: int = 50              # the solver's iteration budget (a Python int: no host sync)
    tol: float = 1e-8               # the tolerance that freezes a converged iterate on the device
    early_exit: bool | None = None  # CPU eager: stop once converged (None: automatic; same result)

    def check(self) -> None:
        if not self.alpha >= 0:
            self.fail("alpha", f"must be >= 0, got {self.alpha}")
        if self.max_iter < 0:
            self.fail("max_iter", f"must be >= 0, got {self.max_iter}")
        if not self.tol >= 0:
            self.fail("tol", f"must be >= 0, got {self.tol}")


@register
class FairGrad(GramMethod):
    """Alpha-fair weights ``G w = w^(-1/alpha)`` (:func:`fairgrad`); no state."""

    name = "fairgrad"
    display = "FairGrad"
    paper = "Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024"
    Options = FairGradOptions
    scale_invariant = False     # w -> s^(-2a/(1+a)) w under J -> sJ
    iterative = True

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return fairgrad(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        """TorchJD's FairGrad (scipy's least_squares on the host; needs scipy)."""
        from torchjd.aggregation import FairGrad as TorchJDFairGrad
        return TorchJDFairGrad(alpha=self.options.alpha)
