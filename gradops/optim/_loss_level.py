"""A loss-level method's bookkeeping inside :class:`~gradops.optim.MTLOptimizer`: its set-up
(parameters joining the inner optimizer), the per-task terms of each step's losses, the epoch's
mean losses (DWA) and the closure's re-evaluated losses (FAMO)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..weighting import LossMethod, StepContext

__all__ = ["LossLevel"]


def _mean_over(values: torch.Tensor, process_group) -> torch.Tensor:
    if process_group is None:
        return values
    world = torch.distributed.get_world_size(process_group)
    torch.distributed.all_reduce(values, group=process_group)
    return values / world


def loss_values(losses: Sequence[torch.Tensor] | torch.Tensor, process_group) -> torch.Tensor:
    """The detached losses ``[T]`` in float32, averaged over ``process_group`` (None: as is)."""
    return _mean_over(torch.stack([l.detach().float().reshape(()) for l in losses]),
                      process_group)


class LossLevel:
    """Drives ``method`` for an optimizer over ``optimizer``'s parameters.

    ``num_tasks`` sets the method up at once (required for a method with parameters: they join
    ``optimizer`` as a parameter group with its defaults, before any LR scheduler is built);
    otherwise the first :meth:`terms` does."""

    def __init__(self, method: LossMethod, optimizer: torch.optim.Optimizer,
                 num_tasks: int | None, device: torch.device):
        self.method = method
        self.ready = False
        self._sum: torch.Tensor | None = None
        self._steps = 0
        if num_tasks is None:
            if method.has_parameters:
                raise ValueError(f"MTLOptimizer: method {method.name!r} learns per-task "
                                 "parameters that the optimizer must hold from the start: pass "
                                 "num_tasks=T")
            return
        self.setup(num_tasks, device, optimizer)

    def setup(self, T: int, device: torch.device, optimizer: torch.optim.Optimizer) -> None:
        self.method.setup(T, device)
        if self.method.parameters():
            optimizer.add_param_group({"params": self.method.parameters()})
        self.ready = True

    def terms(self, losses: Sequence[torch.Tensor] | torch.Tensor, ctx: StepContext,
              process_group, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The method's per-task terms of ``losses`` (scaled by ``ctx.scale`` under AMP)."""
        items = list(losses.unbind(0)) if isinstance(losses, torch.Tensor) else list(losses)
        if not items:
            raise ValueError("MTLOptimizer.backward: losses is empty")
        m = self.method
        if not self.ready:
            self.setup(len(items), items[0].device, optimizer)
        elif len(items) != m.T:
            raise ValueError(f"MTLOptimizer.backward: got {len(items)} losses, but method "
                             f"{m.name!r} was set up for {m.T} tasks")
        values = loss_values(items, process_group)
        if ctx.scale is not None:
            values = values / ctx.scale
        ctx.losses = values
        self._sum = values if self._sum is None else self._sum + values
        self._steps += 1
        return m.terms(items, values, ctx)

    def end_epoch(self, mean_losses: torch.Tensor | None) -> None:
        """The epoch ended: ``mean_losses``, or the mean of the losses seen since the last call."""
        if mean_losses is None:
            if self._sum is None:
                raise ValueError("MTLOptimizer.end_epoch: no backward since the last call; pass "
                                 "mean_losses")
            mean_losses = self._sum / self._steps
        if self.ready:
            self.method.end_epoch(mean_losses.detach().float())
        self._sum, self._steps = None, 0

    def after_step(self, new_losses, process_group) -> None:
        """The losses a closure re-evaluated after the step."""
        if self.ready:
            self.method.after_step(loss_values(new_losses, process_group))
