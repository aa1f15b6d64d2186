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

from ..errors import ConfigError
from ..tasks import Task

__all__ = ["MTLData", "Split", "register_dataset", "dataset_names", "load_dataset"]


@dataclass
class Split:
    """One split in memory: inputs ``x`` ``[N, ...]`` and one target tensor ``[N]`` per task."""

    x: torch.Tensor
    targets: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, n: int) -> Split:
        """The first ``n`` samples."""
        return Split(self.x[:n], {k: v[:n] for k, v in self.targets.items()})


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
