"""CAGrad (Liu et al. 2021)."""
from __future__ import annotations

import math

import torch

from ._common import SolverStatus, _check_iter, _eps, _poison, _prep, _ret, _tiny
from ._solvers import _pairwise_fw


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

    Smoothing: ``||g_w||`` is replaced by ``sqrt(||g_w||^2 + delta^2)`` in the objective and in
    ``lam``, ``delta = smooth * max_i ||g_i||`` (default ``smooth = sqrt(eps)`` of the working
    dtype: 3.5e-4 in fp32, 1.5e-8 in fp64), the scale-free form of the authors' and LibMTL's
    ``sqrt(. + 1e-8)`` and ``+ 1e-8``. It changes nothing measurable unless ``g_w`` nearly
    vanishes at the optimum (``0`` in the hull of the gradients with mild conflict, e.g. a zero
    task gradient or two opposite ones); there the unsmoothed problem is not differentiable and
    its ``d`` not unique (LibMTL's absolute ``1e-8`` then picks an arbitrary one), while the
    smoothed problem is differentiable and picks one ``d`` continuously, with bounded weights
    (``lam <= c ||g0|| / delta``) and ``||d - g0|| <= c ||g0||`` before the rescale. A zero task
    gradient then gives ``d = g0``. In fp32 the residual of such a problem may stay above
    ``tol`` (the curvature is ``~ 1/delta``): the status says so.

    Solver: pairwise Frank-Wolfe with an exact (closed-form) line search of the convex objective,
    from ``w = 1/T``, ``max_iter`` iterations (the authors use scipy SLSQP on the CPU). Residual =
    Frank-Wolfe gap / ``max_i G_ii``; ``converged`` when ``<= tol``. ``c = 0`` needs no solve.
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
    if smooth is None:
        smooth = math.sqrt(_eps(G))
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
        w_star, status = _pairwise_fw(G, max_iter, tol, scale, b=b, k=k, delta2=delta2,
                                      early_exit=early_exit)
    lam = k / torch.sqrt(torch.clamp(w_star @ G @ w_star, min=0.0) + delta2)
    w = 1.0 / T + lam * w_star
    w = w / (1.0, 1.0 + c * c, 1.0 + c)[rescale] + _poison(G)
    status = status._replace(converged=status.converged & torch.isfinite(w).all())
    return _ret(w, status, return_status)
