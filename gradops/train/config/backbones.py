"""The names ``--backbone`` accepts: the built-in encoders, the dense-prediction backbones
(:mod:`gradops.train.models.dense`) and any timm model (``timm`` is optional and imported only
when a name is neither).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import ConfigError

__all__ = ["BUILTIN_BACKBONES", "DENSE_BACKBONES", "check_backbone", "require_timm"]

BUILTIN_BACKBONES = ("cnn", "mlp")
DENSE_BACKBONES = ("segnet", "resnet-dilated")


def require_timm(name: str, choices: Sequence[str] = BUILTIN_BACKBONES) -> Any:
    """The ``timm`` module, when ``name`` is one of its models; else a :class:`ConfigError` of
    ``--backbone`` (timm missing, or an unknown name) listing ``choices``."""
    try:
        import timm
    except ImportError as e:
        raise ConfigError("--backbone", f"{name!r} is not built in and timm is not installed "
                          "(pip install timm)", choices) from e
    if not timm.is_model(name):
        raise ConfigError("--backbone", f"unknown backbone {name!r}",
                          list(choices) + ["a timm model name (timm.list_models())"])
    return timm


def check_backbone(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is built in, a dense backbone or a timm
    model."""
    if name not in BUILTIN_BACKBONES + DENSE_BACKBONES:
        require_timm(name)
