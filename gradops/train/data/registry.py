"""The in-memory form the data sets of the trainer (``--data NAME``) load into, and
:func:`load_dataset`. The registry of their names is :mod:`gradops.train.config.datasets`
(re-exported here).

A data set is a builder ``build(root, data_seed) -> MTLData``. Builders of data sets read from
local files (NYUv2, CityScapes, ...) take ``--data-root PATH``; register them with
:func:`register_dataset` (``needs_root=True``) and ``gradops train --data NAME --data-root PATH``
finds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config.datasets import (check_dataset, dataset_builder, dataset_names,
                               register_dataset)
from ..tasks.types import Task

__all__ = ["MTLData", "Split", "register_dataset", "dataset_names", "check_dataset",
           "load_dataset"]


@dataclass
class Split:
    """One split in memory: inputs ``x`` ``[N, ...]`` and one target tensor ``[N, ...]`` per
    task.

    ``transform`` (optional): ``transform(x, targets, generator) -> (x, targets)``, applied by the
    training loop to every batch after indexing, on the batch's device: with a
    ``torch.Generator`` (CPU, seeded from the run's seed, the epoch and the batch) for training
    batches, which may be augmented; with ``None`` for evaluation batches, which must only be
    converted (e.g. uint8 images to float, compact labels to int64). Without it, batches are
    used as stored.
    """

    x: torch.Tensor
    targets: dict[str, torch.Tensor]
    transform: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, n: int) -> Split:
        """The first ``n`` samples."""
        return Split(self.x[:n], {k: v[:n] for k, v in self.targets.items()}, self.transform)

    def to(self, device: torch.device | str) -> Split:
        """The split with its tensors on ``device`` (the same ``transform``)."""
        return Split(self.x.to(device), {k: v.to(device) for k, v in self.targets.items()},
                     self.transform)

    def batch(self, index: torch.Tensor | slice, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The samples ``index`` (indices or a slice), passed through ``transform``."""
        x = self.x[index]
        ys = {k: v[index] for k, v in self.targets.items()}
        if self.transform is not None:
            x, ys = self.transform(x, ys, generator)
        return x, ys


@dataclass
class MTLData:
    """A multi-task data set: its tasks and its ``train`` / ``val`` / ``test`` splits."""

    name: str
    tasks: list[Task]
    splits: dict[str, Split]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits["train"].x.shape[1:])


def load_dataset(name: str, root: str | None = None, data_seed: int = 0) -> MTLData:
    """Build (or read from the cache) the data set ``name``."""
    return dataset_builder(name, root)(root, data_seed)
