"""Aligned-MTL (Senushkin et al. 2023)."""
from __future__ import annotations

import math

import torch

from ._common import _closed_status, _eigh_psd, _prep, _ret
from dataclasses import dataclass

from ._registry import GramMethod, Options, StepContext, register

ALIGNED_SCALE_MODES = ("min", "median", "rmse")


def alignedmtl(G: torch.Tensor, scale_mode: str = "min", rcond: float | None = None, *,
               return_status: bool = False):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023, Alg. 1): with ``G = V diag(l) V^T`` (``torch.linalg.eigh``,
    not the removed ``symeig``) and the rank cut ``l > T eps l_max`` (``rcond``), the balance
    transformation ``B = sqrt(l_s) V diag(l)^(-1/2) V^T`` on the kept eigenpairs makes the
    transformed gradients ``B J`` orthogonal with equal norms ``sqrt(l_s)``
    (``B G B = l_s * projector onto range(G)``); the update is ``d = (B J)^T 1``: ``w = B 1``.

    ``scale_mode`` picks ``l_s``: ``"min"`` (the smallest kept eigenvalue, the paper's and
    LibMTL's), ``"median"`` (lower median of the kept ones), ``"rmse"`` (their mean; the authors'
    code's name). Scale convention = LibMTL's (``alpha = B.sum(0)``, task weights 1);
    TorchJD's ``AlignedMTL`` uses the mean preference vector: its weights are ours ``/ T``. The
    rank cut uses the working dtype's eps (fp32 or fp64; LibMTL always fp32's). Rank 0 (``G = 0``)
    gives ``B = I`` (TorchJD). Weights are invariant to ``J -> sJ``; ``d`` scales by ``s``.

    Args:
        G: the Gram ``J J^T`` ``[T, T]`` (``T >= 1``, floating point, any device).
        scale_mode: one of :data:`ALIGNED_SCALE_MODES` (``"min"``, ``"median"``, ``"rmse"``).
        rcond: the relative rank cut (>= 0; None: ``T eps`` of the working dtype).
        return_status: also return the :class:`SolverStatus`.

    Returns:
        ``w [T]`` (the update is ``d = w^T J``), or ``(w, status)`` with ``return_status``.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not a square ``[T, T]``, an unknown ``scale_mode``, or a
            negative ``rcond``.
    """
    G = _prep(G, "alignedmtl")
    if scale_mode not in ALIGNED_SCALE_MODES:
        raise ValueError(f"gradops.weighting.alignedmtl: scale_mode must be one of "
                         f"{ALIGNED_SCALE_MODES}, got {scale_mode!r}")
    T = G.shape[0]
    l, V, keep, poison = _eigh_psd(G, rcond)   # l ascending: the kept ones are the last r
    r = keep.sum()
    safe = torch.where(keep, l, torch.ones_like(l))
    if scale_mode == "min":
        ls = torch.where(keep, l, torch.full_like(l, math.inf)).min()
    elif scale_mode == "median":
        pos = torch.clamp(T - r + torch.div(r - 1, 2, rounding_mode="floor"), 0, T - 1)
        ls = torch.gather(l, 0, pos.reshape(1))[0]
    else:
        ls = torch.where(keep, l, torch.zeros_like(l)).sum() / torch.clamp(r, min=1)
    ls = torch.where(r > 0, ls, torch.ones_like(ls))
    isq = torch.where(keep, torch.rsqrt(safe), torch.zeros_like(l))
    ones = torch.ones(T, dtype=G.dtype, device=G.device)
    w = torch.sqrt(ls) * (V @ (isq * (V.T @ ones)))
    w = torch.where(r > 0, w, ones) + poison
    return _ret(w, _closed_status(w), return_status)


@dataclass(frozen=True)
class AlignedMTLOptions(Options):
    scale_mode: str = "min"         # one of ALIGNED_SCALE_MODES
    rcond: float | None = None

    def check(self) -> None:
        self.check_choice("scale_mode", ALIGNED_SCALE_MODES)
        self.check_nonnegative("rcond")


@register
class AlignedMTL(GramMethod):
    """Aligned-MTL's balance transformation (:func:`alignedmtl`)."""

    name = "alignedmtl"
    display = "Aligned-MTL"
    paper = ("Senushkin et al., Independent Component Alignment for Multi-Task Learning, "
             "CVPR 2023")
    Options = AlignedMTLOptions
    order = 80

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return alignedmtl(G, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import AlignedMTL as TorchJDAlignedMTL
        return TorchJDAlignedMTL()
