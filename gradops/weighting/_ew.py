"""Equal weighting (EW, "Joint Train")."""
from __future__ import annotations


import torch

from ._common import _closed_status, _poison, _prep, _ret
from dataclasses import dataclass

from ._registry import Options, SumMethod, register


def ew(G: torch.Tensor, reduction: str = "sum", *, return_status: bool = False):
    """Equal weighting ("Joint Train", docs/methods.md#ew): ``w = 1`` (``reduction="sum"``, the sum
    of the
    losses) or ``w = 1/T`` (``"mean"``, the ST paper's average loss). ``G`` only gives ``T``,
    the device and the dtype.

    Args:
        G: the Gram ``J J^T`` ``[T, T]`` (``T >= 1``, floating point, any device).
        reduction: ``"sum"`` or ``"mean"``.
        return_status: also return the :class:`SolverStatus`.

    Returns:
        ``w [T]`` (the update is ``d = w^T J``), or ``(w, status)`` with ``return_status``.

    Raises:
        TypeError: for a ``G`` that is not a floating-point tensor.
        ValueError: for a ``G`` that is not a square ``[T, T]``, or another ``reduction``.
    """
    G = _prep(G, "ew")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"gradops.weighting.ew: reduction must be 'sum' or 'mean', "
                         f"got {reduction!r}")
    T = G.shape[0]
    w = torch.full((T,), 1.0 if reduction == "sum" else 1.0 / T, dtype=G.dtype, device=G.device)
    w = w + _poison(G)                       # NaN/Inf in G propagate, as in every other method
    return _ret(w, _closed_status(w), return_status)


@dataclass(frozen=True)
class EWOptions(Options):
    reduction: str = "sum"          # "sum": w = 1; "mean": w = 1/T

    def check(self) -> None:
        self.check_choice("reduction", ("sum", "mean"))


@register
class EW(SumMethod):
    """Equal weighting: one backward of ``sum_t L_t`` (or their mean): :func:`ew`."""

    name = "ew"
    display = "Joint Train (ew)"
    paper = "equal weighting (Joint Train), the baseline of every MTL paper"
    Options = EWOptions
    order = 0

    def weights(self, T: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        w = torch.ones(T, dtype=dtype, device=device)
        return w / T if self.options.reduction == "mean" else w

    def torchjd(self, T: int):
        from torchjd.aggregation import Mean, Sum
        return Mean() if self.options.reduction == "mean" else Sum()
