"""IMTL, impartial multi-task learning in full: loss balance (IMTL-L) and gradient balance
(IMTL-G) (Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task
Learning", ICLR 2021)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._imtlg import imtlg
from ._registry import LossMethod, Options, StepContext, register

__all__ = ["IMTL", "IMTLOptions"]


@dataclass(frozen=True)
class IMTLOptions(Options):
    ridge: float = 0.0              # IMTL-G's Tikhonov damping (gradops.weighting.imtlg)
    rcond: float | None = None      # IMTL-G's rank cut of G (default T eps)

    def check(self) -> None:
        if not self.ridge >= 0:
            self.fail("ridge", f"must be >= 0, got {self.ridge}")
        if self.rcond is not None and not self.rcond >= 0:
            self.fail("rcond", f"must be >= 0 or None, got {self.rcond}")


@register
class IMTL(LossMethod):
    """The paper's hybrid balance (IMTL = IMTL-L + IMTL-G) on all shared parameters
    (LibMTL's ``IMTL`` with ``rep_grad=False``):

    - IMTL-L (loss balance): each task loss is scaled by a learned ``e^{s_t}``, the term being
      ``e^{s_t} L_t - s_t`` (``s`` initialised to 0, a parameter trained by the model's
      optimizer: ``MTLOptimizer(num_tasks=T)`` adds it as a parameter group, as LibMTL trains
      its ``loss_scale`` with the model). The gradient of ``s_t`` is that of its term,
      ``e^{s_t} L_t - 1``; task-specific parameters get the terms' gradients unweighted.
    - IMTL-G (gradient balance): the shared parameters are updated with ``d = sum_t alpha_t g_t``,
      ``g_t`` the gradient of task t's *scaled* term and ``alpha`` the IMTL-G weights of their
      Gram: ``alpha = G^+ n / (1^T G^+ n)``, ``n_t = ||g_t||``
      (:func:`gradops.weighting.imtlg`, the paper's closed form ``alpha_{2..T} =
      g_1 U^T (D U^T)^{-1}`` when ``G`` is invertible; LibMTL computes that form with
      ``torch.inverse``).

    Scale convention: ``sum_t alpha_t = 1`` (LibMTL's and the paper's), so LibMTL's learning
    rates carry over; the weights are invariant to ``J -> sJ``. Under AMP the losses arrive
    scaled by ``s``: the ``- s_t`` of each term is multiplied by it (as UW does). TorchJD has
    IMTL-G only (``torchjd.aggregation.IMTLG``, the weighting this reuses), not IMTL-L: no
    TorchJD aggregator here. State: the log scales ``s [T]`` (and the inner optimizer's state of
    them). Cost: the per-task backward passes and the ``T x T`` eigendecomposition of IMTL-G."""

    name = "imtl"
    display = "IMTL"
    paper = "Liu et al., Towards Impartial Multi-task Learning, ICLR 2021"
    Options = IMTLOptions
    has_parameters = True
    weights_from_gram = True
    order = 60

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        self.log_scales = torch.nn.Parameter(torch.zeros(T, device=device))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_scales]

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        s = self.log_scales
        reg = s if ctx.scale is None else s * ctx.scale     # losses are scaled under AMP
        return [torch.exp(s[t]) * loss - reg[t] for t, loss in enumerate(losses)]

    def weights(self, G: torch.Tensor, ctx: StepContext):
        o = self.options
        return imtlg(G, ridge=o.ridge, rcond=o.rcond, return_status=True)

    def loss_weights(self) -> torch.Tensor:
        return torch.exp(self.log_scales.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"log_scales": self.log_scales.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_scales.copy_(state["log_scales"])
