"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
Losses for Scene Geometry and Semantics", CVPR 2018)."""
from __future__ import annotations

from typing import Any

import torch

from ._registry import LossMethod, StepContext, register

__all__ = ["UW"]


@register
class UW(LossMethod):
    """Per-task terms ``exp(-s_t) L_t + s_t`` with learnable log-variances
    ``s_t = log sigma_t^2`` (initialised to 0, the paper's Eq. 7 in LibMTL's form: the same form
    for every task type, without the paper's 1/2 for regression tasks), trained by the model's
    optimizer: ``MTLOptimizer(num_tasks=T)`` adds them to it as a parameter group with its
    defaults. Cost: none beyond the losses."""

    name = "uw"
    display = "UW"
    paper = ("Kendall et al., Multi-Task Learning Using Uncertainty to Weigh Losses for Scene "
             "Geometry and Semantics, CVPR 2018")
    has_parameters = True
    order = 10

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        self.log_vars = torch.nn.Parameter(torch.zeros(T, device=device))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_vars]

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        s = self.log_vars
        reg = s if ctx.scale is None else s * ctx.scale     # losses are scaled under AMP
        return [torch.exp(-s[t]) * loss + reg[t] for t, loss in enumerate(losses)]

    def loss_weights(self) -> torch.Tensor:
        return torch.exp(-self.log_vars.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])
