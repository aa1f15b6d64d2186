"""PCGrad per layer: one PCGrad per parameter tensor of the shared parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.pcgrad import pcgrad_weights, random_orders
from ._registry import LayerMethod, Options, StepContext, register

__all__ = ["PCGradLayer", "PCGradLayerOptions"]


@dataclass(frozen=True)
class PCGradLayerOptions(Options):
    reduction: str = "sum"          # "sum" or "mean" of the projected gradients
    eps: float = 0.0                # added to the squared norms in the projections
    libmtl_self_visit: bool = False  # task i also visits j = i (LibMTL's order)

    def check(self) -> None:
        self.check_choice("reduction", ("sum", "mean"))
        self.check_nonnegative("eps")


@register
class PCGradLayer(LayerMethod):
    """PCGrad (Yu et al., NeurIPS 2020, Alg. 1) applied to each shared parameter tensor on its
    own: the per-layer Grams ``[L, T, T]`` give weights ``[L, T]``
    (:func:`gradops.pcgrad_weights` on the batch of Grams); one random order per step, drawn
    from the optimizer's generator, shared by every layer."""

    name = "pcgrad-layer"
    display = "PCGrad (per layer)"
    paper = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020"
    Options = PCGradLayerOptions
    random = True
    order = 20

    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        L, T, _ = G.shape
        perms = random_orders(T, generator=ctx.generator, device=G.device)
        o = self.options
        return pcgrad_weights(G, perms=perms.expand(L, T, T).contiguous(),
                              reduction=o.reduction, eps=o.eps,
                              libmtl_self_visit=o.libmtl_self_visit)
