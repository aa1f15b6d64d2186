"""Dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._registry import LossMethod, Options, StepContext, register

__all__ = ["DWA", "DWAOptions"]


@dataclass(frozen=True)
class DWAOptions(Options):
    temperature: float = 2.0        # the softmax temperature of the loss ratios (Eq. 7)

    def check(self) -> None:
        if not self.temperature > 0:
            self.fail("temperature", f"must be > 0, got {self.temperature}")


@register
class DWA(LossMethod):
    """Weights ``w_t = T softmax_t(r_t / temperature)`` with ``r_t = L_t(e-1) / L_t(e-2)``, the
    ratio of the last two epochs' mean training losses (the paper's Eq. 7); ``w = 1`` in the
    first two epochs. Terms ``w_t L_t``. Needs the epoch's mean losses:
    ``MTLOptimizer.end_epoch()``. Cost: none beyond the losses."""

    name = "dwa"
    display = "DWA"
    paper = "Liu et al., End-to-End Multi-Task Learning with Attention, CVPR 2019"
    Options = DWAOptions
    order = 20

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        self.history: list[torch.Tensor] = []     # the last two epochs' mean losses
        self._w = torch.ones(T, device=device)

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        return [self._w[t] * loss for t, loss in enumerate(losses)]

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        self.history = (self.history + [mean_losses.detach().clone()])[-2:]
        if len(self.history) == 2:
            r = self.history[1] / self.history[0]
            self._w = self.T * torch.softmax(r / self.options.temperature, dim=0)

    def loss_weights(self) -> torch.Tensor:
        return self._w

    def state_dict(self) -> dict[str, Any]:
        return {"history": [h.clone() for h in self.history], "w": self._w.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self._w.device
        self.history = [h.to(dev) for h in state["history"]]
        self._w = state["w"].to(dev)
