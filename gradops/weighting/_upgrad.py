"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
arXiv:2406.16232, 2024)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import _check_iter, _prep, _ret
from ._dualcone import DualConeOptions, dual_cone_weights
from ._registry import GramMethod, StepContext, register

__all__ = ["UPGrad", "UPGradOptions", "upgrad"]


def upgrad(G: torch.Tensor, reg_eps: float = 1e-4, max_iter: int = 250, tol: float = 1e-6, *,
           early_exit: bool | None = None, return_status: bool = False):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    Eq. 5 with Eq. 3 and Proposition 1): every task gradient ``g_i`` is projected onto the dual
    cone ``{x : J x >= 0}`` of all of them, and the projections are averaged,
    ``d = 1/T sum_i pi_J(g_i)``. By Proposition 1, ``pi_J(J^T u) = J^T v(u)`` with
    ``v(u) = argmin_{v >= u} v^T G v``, so ``w = sum_i v(e_i / T)``: T small QPs, one per task,
    solved together from ``G`` on its device
    (:func:`gradops.weighting._dualcone.dual_cone_weights`: Lawson-Hanson's active-set method,
    at most ``max_iter`` steps, no host synchronisation; its status says when it did not
    converge). ``G`` is normalised by its trace and regularised by ``reg_eps I`` first, as
    TorchJD does (default ``reg_eps = 1e-4``, TorchJD's and LibMTL's).

    Scale convention: ``d = w^T J`` is TorchJD's ``UPGrad()`` (default preference vector
    ``1/T``) and LibMTL's ``UPGrad`` (the same weights applied to the raw gradients): the mean
    scale, ``d = mean_i g_i`` when the gradients do not conflict, so their learning rates carry
    over (EW's sum convention would need ``T`` times less). ``w >= 1/T`` elementwise. Weights are
    invariant to ``J -> sJ`` (the regularisation is relative to ``tr(G)``); ``d`` scales by
    ``s``. One difference from TorchJD: its ``norm_eps`` replaces a Gram of trace ``< 1e-4``
    (an absolute threshold) by 0, returning the mean; gradops solves every Gram.

    State: none. Cost beyond the ``T`` backward passes: the Gram, then ``T`` bound-constrained
    ``T x T`` QPs solved in a batch, each step a batched ``T x T`` Cholesky factorisation
    (``O(T^4)`` per step, float64).
    """
    G = _prep(G, "upgrad")
    _check_iter("upgrad", max_iter, tol)
    if not isinstance(reg_eps, (int, float)) or not reg_eps >= 0:
        raise ValueError(f"gradops.weighting.upgrad: reg_eps must be a float >= 0, "
                         f"got {reg_eps!r}")
    T = G.shape[0]
    U = torch.eye(T, dtype=G.dtype, device=G.device) / T
    V, status = dual_cone_weights(G, U, float(reg_eps), max_iter, tol, early_exit)
    return _ret(V.sum(0), status, return_status)


@dataclass(frozen=True)
class UPGradOptions(DualConeOptions):
    """UPGrad's options (:class:`DualConeOptions`)."""


@register
class UPGrad(GramMethod):
    """Unconflicting projection of gradients (:func:`upgrad`)."""

    name = "upgrad"
    display = "UPGrad"
    paper = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, arXiv 2024"
    Options = UPGradOptions
    iterative = True

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return upgrad(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import UPGrad as TorchJDUPGrad
        from torchjd.linalg import QuadprogProjector
        return TorchJDUPGrad(projector=QuadprogProjector(reg_eps=self.options.reg_eps))
