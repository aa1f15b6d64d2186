"""DualProj (TorchJD; the projection of Lopez-Paz & Ranzato's GEM, NeurIPS 2017, Eq. 11,
applied to the mean gradient)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import _check_iter, _prep, _ret
from ._dualcone import DualConeOptions, dual_cone_weights
from ._registry import GramMethod, StepContext, register

__all__ = ["DualProj", "DualProjOptions", "dualproj"]


def dualproj(G: torch.Tensor, reg_eps: float = 1e-4, max_iter: int = 250, tol: float = 1e-6,
             *, early_exit: bool | None = None, return_status: bool = False):
    """DualProj (TorchJD's ``DualProj``; Quinton & Rey, "Jacobian Descent for Multi-Objective
    Optimization", 2024, Sec. 3 and Proposition 1; the projection is GEM's, Lopez-Paz &
    Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, Eq. 11): the mean
    gradient projected onto the dual cone ``{x : J x >= 0}`` of the task gradients,
    ``d = pi_J(1/T sum_i g_i) = J^T v``, ``v = argmin_{v >= 1/T} v^T G v``: one small QP solved
    from ``G`` on its device (:func:`gradops.weighting._dualcone.dual_cone_weights`, the solver
    UPGrad uses: Lawson-Hanson's active-set method, at most ``max_iter`` steps, no host
    synchronisation, a status that says when it did not converge). ``G`` is normalised by its
    trace and regularised by ``reg_eps I`` first, as TorchJD does (default ``1e-4``).

    Scale convention: TorchJD's ``DualProj()`` (preference vector ``1/T``): the mean scale,
    ``d = mean_i g_i`` when the mean conflicts with no task (``w = 1/T``), so TorchJD's learning
    rates carry over; LibMTL has no DualProj. ``w >= 1/T``. Weights are invariant to
    ``J -> sJ``; ``d`` scales by ``s``. Unlike TorchJD, no absolute ``norm_eps`` (TorchJD returns
    the mean when ``tr(G) < 1e-4``).

    State: none. Cost beyond the ``T`` backward passes: the Gram and one ``T x T``
    bound-constrained QP (a ``T x T`` Cholesky factorisation per active-set step, float64).
    """
    G = _prep(G, "dualproj")
    _check_iter("dualproj", max_iter, tol)
    if not isinstance(reg_eps, (int, float)) or not reg_eps >= 0:
        raise ValueError(f"gradops.weighting.dualproj: reg_eps must be a float >= 0, "
                         f"got {reg_eps!r}")
    T = G.shape[0]
    U = torch.full((1, T), 1.0 / T, dtype=G.dtype, device=G.device)
    V, status = dual_cone_weights(G, U, float(reg_eps), max_iter, tol, early_exit)
    return _ret(V[0], status, return_status)


@dataclass(frozen=True)
class DualProjOptions(DualConeOptions):
    """DualProj's options (:class:`DualConeOptions`)."""


@register
class DualProj(GramMethod):
    """The mean gradient projected onto the dual cone (:func:`dualproj`)."""

    name = "dualproj"
    display = "DualProj"
    paper = ("Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv 2024 "
             "(TorchJD); GEM's projection, Lopez-Paz & Ranzato, NeurIPS 2017")
    Options = DualProjOptions
    iterative = True

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return dualproj(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import DualProj as TorchJDDualProj
        from torchjd.linalg import QuadprogProjector
        return TorchJDDualProj(projector=QuadprogProjector(reg_eps=self.options.reg_eps))
