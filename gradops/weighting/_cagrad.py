"""CAGrad (Liu et al. 2021)."""
from __future__ import annotations

import math

import torch

from ._common import SolverStatus, _check_iter, _eps, _poison, _prep, _ret, _tiny
from ._solvers import _simplex_qp
from dataclasses import dataclass

from ._registry import GramMethod, Options, StepContext, register


def cagrad(G: torch.Tensor, c: float = 0.4, rescale: int = 1, max_iter: int = 250,
           tol: float = 1e-6, smooth: float | None = None, *, early_exit: bool | None = None,
           return_status: bool = False):
    """CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, Alg. 1, solved in its dual form over the simplex): with ``g0 = mean_i g_i``,
    ``w* = argmin_{w in simplex} w^T G 1/T + c ||g0|| sqrt(w^T G w)`` and
    ``d = g0 + (c ||g0|| / ||g_w||) g_w``, ``g_w = J^T w*``, then divided by ``1 + c^2``
    (``rescale=1``, default), ``1 + c`` (``2``) or nothing (``0``), as in the authors' code.

    Scale convention = LibMTL's and the authors' (``g0`` the **mean** gradient):
    ``w = (1/T + lam w*) / r``, ``lam = c ||g0|| / ||g_w||``, ``r`` the rescale divisor; so
    ``c = 0`` gives the mean (``rescale`` 0/1) and TorchJD's ``CAGrad(c)`` equals ``rescale=0``.
    All quantities come from ``G`` (``||g0||^2 = 1^T G 1 / T^2``, ``||g_w||^2 = w^T G w``).
    Weights are invariant to ``J -> sJ``; ``d`` scales by ``s``.

    The problem solved (their Eq. 3, primal): ``max_d min_i g_i . d`` subject to
    ``||d - g0|| <= c ||g0||``; ``d`` (before the rescale) is its maximiser, up to the smoothing
    below. When ``0`` is in the convex hull of the gradients and ``c >= 1``, ``d = 0`` is
    feasible and the optimal value is ``0``: every maximiser is then non-conflicting
    (``g_i . d >= 0`` for all ``i``), and this one is too, within ``smooth * c ||g0|| max_i
    ||g_i||`` (the smoothing's bound, below).

    Smoothing: ``||g_w||`` is replaced by ``sqrt(||g_w||^2 + delta^2)`` in the objective and in
    ``lam``, ``delta = smooth * max_i ||g_i||`` (default ``smooth = max(sqrt(eps), 1e-6)`` of
    the working dtype: 3.5e-4 in fp32, 1e-6 in fp64, where ``delta^2`` stays well above the
    float64 solver's rounding of ``||g_w||^2``, about ``T eps max_i G_ii``; it was ``sqrt(eps)``
    = 1.5e-8 in fp64, at that rounding level), the scale-free form of the authors' and LibMTL's
    ``sqrt(. + 1e-8)`` and ``+ 1e-8``. The smoothed dual is CAGrad's dual for the gradients
    ``(g_i, delta)`` lifted by one shared coordinate, so the ``d`` returned maximises
    ``min_i g_i . d + delta c ||g0|| sqrt(1 - ||d - g0||^2 / (c ||g0||)^2)`` over the same
    ball: it is feasible for the primal above and within ``delta c ||g0||`` of its optimal
    value, and where the primal's maximiser is not unique (``g_w`` vanishes at the optimum:
    ``0`` in the hull with mild conflict, a zero task gradient, two opposite ones) it picks the
    one nearest ``g0`` (LibMTL's absolute ``1e-8`` picks an arbitrary one), with bounded weights
    (``lam <= c ||g0|| / delta``). A zero task gradient then gives ``d = g0``.

    Scale: every tolerance above is relative (``delta`` scales with the gradients), so the
    answer does not depend on the gradients' scale: at ``J -> 1e-10 J`` or ``1e15 J`` the
    weights are the same (TorchJD's absolute thresholds return 0 at ``1e-10``).

    Solver: an exact active-set method on the simplex (see
    :func:`gradops.weighting._solvers._simplex_qp`: Wolfe's min-norm-point iteration for the
    quadratic ``1/2 w^T G w + t b^T w``, and an outer update of ``t`` by the closed-form root of
    ``w^T G w + delta^2 = (c ||g0|| t)^2`` on the current corral, safeguarded by bisection), in
    float64, at most ``max_iter`` steps in all (the authors use scipy SLSQP on the CPU).
    Residual = Frank-Wolfe gap of the smoothed dual / ``max_i G_ii``; ``converged`` when
    ``<= tol``: a problem that does not converge within ``max_iter`` says so. ``c = 0`` needs no
    solve.

    Args:
        G: the Gram ``J J^T`` ``[T, T]`` (``T >= 1``, floating point, any device).
        c: the radius of the ball around ``g0``, relative to ``||g0||`` (>= 0).
        rescale: the final divisor: 0 (none), 1 (``1 + c^2``) or 2 (``1 + c``).
        max_iter: the solver's iteration budget (a Python int >= 0: no host synchronisation).
        tol: the residual at which the iterate counts as converged and is frozen (>= 0).
        early_exit: stop the loop once converged (None: on CPU tensors in eager mode only;
            the result is the same either way).
        smooth: the relative smoothing ``delta / max_i ||g_i||`` (>= 0; None: the working
            dtype's default above).
        return_status: also return the :class:`SolverStatus`.

    Returns:
        ``w [T]`` (the update is ``d = w^T J``), or ``(w, status)`` with ``return_status``.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not a square ``[T, T]``, a negative ``c`` or ``smooth``,
            another ``rescale``, or a bad ``max_iter`` / ``tol``.
    """
    G = _prep(G, "cagrad")
    _check_iter("cagrad", max_iter, tol)
    if not isinstance(c, (int, float)) or not c >= 0:
        raise ValueError(f"gradops.weighting.cagrad: c must be a float >= 0, got {c!r}")
    if rescale not in (0, 1, 2):
        raise ValueError(f"gradops.weighting.cagrad: rescale must be 0, 1 or 2, got {rescale!r}")
    T = G.shape[0]
    b = G.sum(1) / T                                          # G 1 / T = J g0
    g0_norm = torch.sqrt(torch.clamp(b.sum() / T, min=0.0))   # ||g0||^2 = 1^T G 1 / T^2
    k = c * g0_norm
    if smooth is None:                      # see the docstring: 3.5e-4 (fp32), 1e-6 (fp64)
        smooth = max(math.sqrt(_eps(G)), 1e-6)
    if not isinstance(smooth, (int, float)) or not smooth >= 0:
        raise ValueError(f"gradops.weighting.cagrad: smooth must be a float >= 0, got {smooth!r}")
    scale = torch.clamp(G.diagonal().max(), min=_tiny(G))
    delta2 = (smooth * smooth) * scale + _tiny(G)
    if c == 0:
        w_star = torch.full((T,), 1.0 / T, dtype=G.dtype, device=G.device)
        status = SolverStatus(torch.ones((), dtype=torch.bool, device=G.device),
                              torch.zeros((), dtype=torch.int64, device=G.device),
                              torch.zeros((), dtype=G.dtype, device=G.device))
    else:
        w_star, status = _simplex_qp(G, max_iter, tol, scale, b=b, k=k, delta2=delta2,
                                      early_exit=early_exit)
    ws, Gd = w_star.double(), G.double()       # ||g_w||^2 ~ delta2 is a cancellation: in fp64
    rho = torch.sqrt(torch.clamp(ws @ Gd @ ws + delta2.double(), min=1e-300))
    lam = (k.double() / rho).to(G.dtype)
    w = 1.0 / T + lam * w_star
    w = w / (1.0, 1.0 + c * c, 1.0 + c)[rescale] + _poison(G)
    # a new tuple, not status._replace: torch 2.11's dynamo cannot rebuild a NamedTuple that
    # _replace made inside a fullgraph trace
    status = SolverStatus(status.converged & torch.isfinite(w).all(), status.iterations,
                          status.residual)
    return _ret(w, status, return_status)


@dataclass(frozen=True)
class CAGradOptions(Options):
    c: float = 0.4                  # the radius of the ball around the mean gradient
    rescale: int = 1                # 0, 1 (divide by 1 + c^2, LibMTL) or 2 (by 1 + c)
    max_iter: int = 250             # the solver's iteration budget (a Python int: no host sync)
    tol: float = 1e-6               # the tolerance that freezes a converged iterate on the device
    smooth: float | None = None
    early_exit: bool | None = None  # CPU eager: stop once converged (None: automatic; same result)

    def check(self) -> None:
        self.check_nonnegative("max_iter", "tol", "c", "smooth")
        self.check_choice("rescale", (0, 1, 2))


@register
class CAGrad(GramMethod):
    """Conflict-averse gradient descent (:func:`cagrad`)."""

    name = "cagrad"
    display = "CAGrad"
    paper = "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021"
    Options = CAGradOptions
    iterative = True
    order = 50

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return cagrad(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import CAGrad as TorchJDCAGrad
        return TorchJDCAGrad(c=self.options.c)
