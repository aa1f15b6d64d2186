"""Geometric loss strategy (Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream
Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops
2019)."""
from __future__ import annotations

import torch

from ._registry import LossMethod, StepContext, register

__all__ = ["GLS"]


@register
class GLS(LossMethod):
    """The loss is the geometric mean of the task losses, ``L = (prod_t L_t)^(1/T)`` (the
    paper's geometric loss strategy; LibMTL's ``GLS``:
    ``torch.pow(losses.prod(), 1/T).backward()``). Its gradient is ``sum_t a_t grad L_t``
    with ``a_t = L / (T L_t)``: the terms returned are ``a_t L_t`` with ``a`` computed from the
    detached (global-batch, unscaled) losses, which gives exactly that gradient, keeps every
    task's gradient separate for the statistics and, being a product, scales correctly under
    AMP. ``L`` is computed as ``exp(mean_t log L_t)`` (no underflow of the product for many
    small losses; the same value).

    Scale convention: LibMTL's (the gradient of the geometric mean itself, whose weights sum to
    ``L sum_t 1/(T L_t)``, 1 when the losses are equal), so its learning rates carry over.
    TorchJD has no GLS. The losses must be positive: a zero loss gives ``0/0`` (the geometric
    mean's gradient is singular there) and a negative one ``log`` of a negative: NaN, which
    propagates. State: none. Cost: none beyond the losses."""

    name = "gls"
    display = "GLS"
    paper = ("Chennupati et al., MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss "
             "Strategy for Multi-Task Learning, CVPR Workshops 2019")
    order = 50

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        self._w: torch.Tensor | None = None

    def coefficients(self, values: torch.Tensor) -> torch.Tensor:
        """``a_t = (prod_s L_s)^(1/T) / (T L_t)`` from the detached losses ``[T]``.

        Args:
            values: the detached, unscaled losses ``[T]``.

        Returns:
            ``a [T]`` in ``values``' dtype (computed in float64).
        """
        v = values.detach().to(torch.float64)
        gm = torch.exp(torch.log(v).mean())
        return (gm / (v.numel() * v)).to(values.dtype)

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        a = self._w = self.coefficients(values)
        return [a[t].to(loss.dtype) * loss for t, loss in enumerate(losses)]

    def loss_weights(self) -> torch.Tensor | None:
        return self._w
