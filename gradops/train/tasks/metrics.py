"""The metrics of one pass over a split, accumulated batch by batch.

Tasks with streaming metrics (:mod:`.dense`) update a small state on the device per batch;
the others (:mod:`.types`) keep their predictions and the batch's targets (as used, i.e. after
any ``Split.transform``) and compute their metrics once from the concatenation. Under torchrun the
states are summed and the predictions gathered over the processes when the metrics are read.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from .dense import is_streaming
from .types import Task

__all__ = ["MetricAccumulator", "Processes"]


class Processes(Protocol):
    """What the accumulator needs of :class:`gradops.train.engine.distributed.Dist`: whether
    torchrun's process group is on, and the concatenation of a tensor over the processes."""

    enabled: bool

    def gather_cat(self, t: torch.Tensor) -> torch.Tensor: ...


class MetricAccumulator:
    """``add(outs, ys)`` per batch, ``result()`` once: ``{task: {metric: 0-dim tensor}}``."""

    def __init__(self, tasks: Sequence[Task], device: torch.device, dist: Processes | None = None):
        self.tasks, self.dist = list(tasks), dist
        self.states = {t.name: t.metric_state(device) for t in self.tasks if is_streaming(t)}
        self.preds: dict[str, list[torch.Tensor]] = {t.name: [] for t in self.tasks
                                                     if not is_streaming(t)}
        self.ys: dict[str, list[torch.Tensor]] = {k: [] for k in self.preds}

    def add(self, outs: Mapping[str, torch.Tensor], ys: Mapping[str, torch.Tensor]) -> None:
        """One batch: the model's outputs and the batch's targets."""
        for t in self.tasks:
            pred = t.predict(outs[t.name].detach())
            if t.name in self.states:
                t.update(self.states[t.name], pred, ys[t.name])
            else:
                self.preds[t.name].append(pred)
                self.ys[t.name].append(ys[t.name])

    def result(self) -> dict[str, dict[str, torch.Tensor]]:
        """The metrics of every task over everything added (in every process)."""
        d = self.dist
        out = {}
        for t in self.tasks:
            if t.name in self.states:
                state = self.states[t.name]
                if d is not None and d.enabled:
                    import torch.distributed as tdist
                    for v in state.values():
                        tdist.all_reduce(v)
                out[t.name] = t.finish(state)
            else:
                p, y = torch.cat(self.preds[t.name]), torch.cat(self.ys[t.name])
                if d is not None:
                    p, y = d.gather_cat(p), d.gather_cat(y)
                out[t.name] = t.metrics_of(p, y)
        return out
