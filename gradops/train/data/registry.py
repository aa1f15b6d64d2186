"""The registry of data sets the trainer knows (``--data NAME``) and the in-memory form they
load into.

A data set is a builder ``build(root, data_seed) -> MTLData``. Builders of data sets read from
local files (NYUv2, CityScapes, ...) take ``--data-root PATH``; register them with
:func:`register_dataset` (``needs_root=True``) and ``gradops train --data NAME --data-root PATH``
finds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config.errors import ConfigError
from ..tasks.types import Task

__all__ = ["MTLData", "Split", "register_dataset", "dataset_names", "load_dataset"]


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


@dataclass
class _Entry:
    build: Callable[..., MTLData]
    needs_root: bool
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, build: Callable[..., MTLData], *, needs_root: bool = False,
                     description: str = "") -> None:
    """Make ``build(root, data_seed) -> MTLData`` available as ``--data name``."""
    if name in _REGISTRY:
        raise ValueError(f"register_dataset: {name!r} is already registered")
    _REGISTRY[name] = _Entry(build, needs_root, description)


def dataset_names() -> tuple[str, ...]:
    """The names ``--data`` accepts."""
    return tuple(_REGISTRY)


def check_dataset(name: str, root: str | None) -> None:
    """Raise :class:`ConfigError` for an unknown name or a missing ``--data-root``."""
    if name not in _REGISTRY:
        raise ConfigError("--data", f"unknown data set {name!r}", dataset_names())
    if _REGISTRY[name].needs_root and not root:
        raise ConfigError("--data-root", f"data set {name!r} reads local files: give their "
                          "directory")


def load_dataset(name: str, root: str | None = None, data_seed: int = 0) -> MTLData:
    """Build (or read from the cache) the data set ``name``."""
    check_dataset(name, root)
    return _REGISTRY[name].build(root, data_seed)
