"""Coordinate-wise trimmed mean of the task gradients (Yin, Chen, Ramchandran & Bartlett,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018), as
TorchJD's ``TrimmedMean`` aggregator applies it to the rows of the Jacobian."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._registry import ElementwiseMethod, Options, StepContext, register

__all__ = ["TrimmedMean", "TrimmedMeanOptions", "trimmed_mean"]


@dataclass(frozen=True)
class TrimmedMeanOptions(Options):
    trim_number: int = 1            # b: values removed at each end of every coordinate (2b in all)

    def check(self) -> None:
        if not self.trim_number >= 0:
            self.fail("trim_number", f"must be >= 0, got {self.trim_number}")


def trimmed_mean(J: torch.Tensor, trim_number: int) -> torch.Tensor:
    """``g_k = mean(sort(J[:, k])[b : T - b])`` for every column ``k`` of ``J [T, P]``
    (``b = trim_number``; needs ``T >= 2b + 1``), in ``J``'s dtype.

    Non-finite values propagate: a NaN sorts last and an Inf at one end, where trimming would
    drop them, so a column whose smallest or largest value is not finite gives NaN (a column
    whose kept values hold the Inf keeps the mean's own Inf)."""
    T = J.shape[0]
    if T < 2 * trim_number + 1:
        raise ValueError(f"method 'trimmed-mean': option 'trim_number' = {trim_number} needs at "
                         f"least 2 * trim_number + 1 = {2 * trim_number + 1} tasks, got T = {T}")
    if trim_number == 0:
        return J.mean(0)            # nothing trimmed: no sort (and NaN/Inf propagate as is)
    s = torch.sort(J, dim=0).values
    out = s[trim_number:T - trim_number].mean(0)
    dropped_bad = ~(torch.isfinite(s[0]) & torch.isfinite(s[-1]))
    return torch.where(dropped_bad & torch.isfinite(out), torch.full_like(out, float("nan")),
                       out)


@register
class TrimmedMean(ElementwiseMethod):
    """Per parameter coordinate ``k``, sort the ``T`` task gradients' entries ``J[:, k]``, drop
    the ``b`` smallest and the ``b`` largest, and average the ``T - 2b`` left
    (:func:`trimmed_mean`; the paper's coordinate-wise trimmed mean, Definition 2 / Algorithm 1
    option II, with the workers' gradients replaced by the tasks'). It is TorchJD 0.18's
    ``TrimmedMean(trim_number=b)`` (same sort, same mean), with a default of ``b = 1`` where
    TorchJD has none; ``T >= 2b + 1`` is required (a one-line error naming ``trim_number``).

    Scale: a mean, LibMTL's and TorchJD's mean scale: with ``b = 0`` the update is EW's
    ``mean`` reduction (``1/T`` of gradops' default ``sum``), so learning rates tuned for
    TorchJD's ``TrimmedMean`` / ``Mean`` carry over; multiply them by ``1/T`` coming from EW's
    sum. The update is positively homogeneous (``J -> sJ`` gives ``s d``), so AMP's scaled
    gradients need no unscaling.

    It is not a weighting of whole rows (each coordinate keeps its own tasks), so it cannot be
    computed from the Gram: it runs as an element-wise method, one sort over ``J``. State:
    none. Cost: one sort of ``J`` along the task axis (a sorted copy of ``J``, ``[T, P]``
    values plus the ``int64`` indices ``torch.sort`` returns, transient) and one reduction over
    it; ``b = 0`` is a plain mean without the sort. No Gram is formed."""

    name = "trimmed-mean"
    display = "TrimmedMean"
    paper = ("Yin et al., Byzantine-Robust Distributed Learning: Towards Optimal Statistical "
             "Rates, ICML 2018 (TorchJD's TrimmedMean)")
    Options = TrimmedMeanOptions
    order = 200

    def combine(self, J: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return trimmed_mean(J, self.options.trim_number)

    def torchjd(self, T: int):
        from torchjd.aggregation import TrimmedMean as TorchJDTrimmedMean
        return TorchJDTrimmedMean(trim_number=self.options.trim_number)
