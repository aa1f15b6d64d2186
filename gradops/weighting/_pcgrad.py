"""PCGrad (Yu et al. 2020) as a weighting of the Gram."""
from __future__ import annotations


import torch

from ..ops.pcgrad import pcgrad_weights
from ._common import _closed_status, _ret
from dataclasses import dataclass

from ._registry import GramMethod, Options, StepContext, register


def pcgrad(G: torch.Tensor, generator: torch.Generator | None = None,
           perms: torch.Tensor | None = None, reduction: str = "sum",
           libmtl_self_visit: bool = False, *, return_status: bool = False):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1) in
    Gram form: :func:`gradops.pcgrad_weights` (docs/methods.md#pcgrad). Task ``i`` visits the
    tasks ``j != i`` (the paper's Alg. 1, TorchJD's); ``libmtl_self_visit=True`` also visits
    ``j = i``, LibMTL's convention. Weights are float32 (float64 for a float64 ``G``: the
    recurrence then runs in float64); invariant to ``J -> sJ``.

    Args:
        G: the Gram ``J J^T`` ``[T, T]`` (``T >= 1``, floating point, any device).
        generator, perms, reduction, libmtl_self_visit: as in :func:`gradops.pcgrad_weights`
            (``perms`` is ``[T, T]``).
        return_status: also return the :class:`SolverStatus`.

    Returns:
        ``w [T]`` (the update is ``d = w^T J``), or ``(w, status)`` with ``return_status``.

    Raises:
        ValueError: for a ``G`` that is not ``[T, T]``, and as :func:`gradops.pcgrad_weights`
            for bad ``perms`` or ``reduction``.
        TypeError: for a ``G`` that is not floating point.
    """
    if not isinstance(G, torch.Tensor) or G.dim() != 2:
        raise ValueError(f"gradops.weighting.pcgrad: G must be a square Gram [T, T], got "
                         f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    w = pcgrad_weights(G, generator=generator, perms=perms, reduction=reduction,
                       libmtl_self_visit=libmtl_self_visit)
    return _ret(w, _closed_status(w), return_status)


@dataclass(frozen=True)
class PCGradOptions(Options):
    reduction: str = "sum"          # "sum" or "mean" of the projected gradients
    libmtl_self_visit: bool = False  # task i also visits j = i (LibMTL's order)

    def check(self) -> None:
        self.check_choice("reduction", ("sum", "mean"))


@register
class PCGrad(GramMethod):
    """PCGrad over the whole model (:func:`pcgrad`): random orders from the optimizer's
    generator."""

    name = "pcgrad"
    display = "PCGrad"
    paper = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020"
    Options = PCGradOptions
    random = True
    order = 10

    def weights(self, G: torch.Tensor, ctx: StepContext):
        return pcgrad(G, generator=ctx.generator, **self.options.as_dict(), return_status=True)

    def torchjd(self, T: int):
        from torchjd.aggregation import PCGrad as TorchJDPCGrad
        return TorchJDPCGrad()
