"""Dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019)."""
from __future__ import annotations

from typing import Any

import torch

from .base import LossMethod

__all__ = ["DWA"]


class DWA(LossMethod):
    """Weights ``w_t = T softmax_t(r_t / temperature)`` with ``r_t = L_t(e-1) / L_t(e-2)``, the
    ratio of the last two epochs' mean training losses; ``w = 1`` in the first two epochs. Terms
    ``w_t L_t``."""

    name = "dwa"

    def __init__(self, T: int, device: torch.device, temperature: float = 2.0):
        self.T, self.temperature = T, float(temperature)
        self.history: list[torch.Tensor] = []     # the last two epochs' mean losses
        self._w = torch.ones(T, device=device)

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor) -> list[torch.Tensor]:
        return [self._w[t] * loss for t, loss in enumerate(losses)]

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        self.history = (self.history + [mean_losses.detach().clone()])[-2:]
        if len(self.history) == 2:
            r = self.history[1] / self.history[0]
            self._w = self.T * torch.softmax(r / self.temperature, dim=0)

    def weights(self) -> torch.Tensor:
        return self._w

    def state_dict(self) -> dict[str, Any]:
        return {"history": [h.clone() for h in self.history], "w": self._w.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        dev = self._w.device
        self.history = [h.to(dev) for h in sd["history"]]
        self._w = sd["w"].to(dev)
