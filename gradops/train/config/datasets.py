"""The names of the data sets the trainer knows (``--data NAME``): the registry that
:func:`register_dataset` fills and :meth:`~gradops.train.config.schema.TrainConfig.validate`
checks ``--data`` / ``--data-root`` against.

The builders themselves live in :mod:`gradops.train.data`, which registers the built-in data sets
when it is imported (``import gradops.train`` imports it); more are added with
:func:`register_dataset` (re-exported there). A builder is ``build(root, data_seed) -> MTLData``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError

__all__ = ["register_dataset", "dataset_names", "check_dataset", "dataset_builder"]


@dataclass
class _Entry:
    build: Callable[..., Any]
    needs_root: bool
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, build: Callable[..., Any], *, needs_root: bool = False,
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


def dataset_builder(name: str, root: str | None) -> Callable[..., Any]:
    """The builder of ``name`` (checked with :func:`check_dataset` first)."""
    check_dataset(name, root)
    return _REGISTRY[name].build
