"""The interface of a loss-level method."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["LossMethod"]


class LossMethod:
    """Base class: ``terms(losses, values)`` -> the T per-task terms to back-propagate.

    ``losses`` are the T task losses (scalars) with their graph; ``values`` the same losses detached
    (under torch.distributed: averaged over the processes, i.e. the global batch's losses).
    ``after_step(new_values)`` receives the losses of the same batch after the optimizer step
    when :attr:`needs_losses_after_step` is set; ``end_epoch(mean_losses)`` the epoch's mean
    losses.
    """

    name = "base"
    needs_losses_after_step = False

    def parameters(self) -> list[torch.nn.Parameter]:
        """Parameters to train with the model's inner optimizer."""
        return []

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def after_step(self, new_values: torch.Tensor) -> None:
        """Called with the batch's losses after the step (methods that need them)."""

    def end_epoch(self, mean_losses: torch.Tensor) -> None:
        """Called with the epoch's mean training losses."""

    def weights(self) -> torch.Tensor | None:
        """The current loss weights, for logging (None when the method has none)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass
