"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
Losses", CVPR 2018)."""
from __future__ import annotations

from typing import Any

import torch

from .base import LossMethod

__all__ = ["UW"]


class UW(LossMethod):
    """Per-task terms ``exp(-s_t) L_t + s_t`` with learnable log-variances ``s_t = log sigma_t^2``
    (initialised to 0), trained by the model's optimizer. The same form for every task type, as
    LibMTL uses (the paper's 1/2 factor of regression tasks is dropped)."""

    name = "uw"

    def __init__(self, T: int, device: torch.device):
        self.log_vars = torch.nn.Parameter(torch.zeros(T, device=device))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.log_vars]

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor) -> list[torch.Tensor]:
        s = self.log_vars
        return [torch.exp(-s[t]) * loss + s[t] for t, loss in enumerate(losses)]

    def weights(self) -> torch.Tensor:
        return torch.exp(-self.log_vars.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_vars.copy_(sd["log_vars"])
