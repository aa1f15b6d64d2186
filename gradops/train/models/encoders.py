"""Models of the trainer: a shared encoder and one head per task (hard parameter sharing).

Encoders (``--backbone``):

- ``cnn`` (default): three 3x3 conv + BatchNorm + ReLU blocks (widths ``w, 2w, 2w``), two 2x2
  max-pools, then a Linear layer to ``4w`` features;
- ``mlp``: Flatten, two Linear + ReLU layers of ``8w`` units (no BatchNorm: what the multi-process
  equality test uses, since BatchNorm's batch statistics are per process);
- any other name: a timm model (``timm.create_model(name, pretrained=False, num_classes=0)``, one
  input channel), random init, or weights from a local file with ``--weights PATH`` (a state dict
  of the encoder, or a checkpoint holding one under ``"state_dict"`` / ``"model"``).

Every layer is a named module (``encoder.conv1``, ``encoder.bn1``, ...), so per-layer statistics
and sparse masks name them. Heads are Linear layers in ``heads[<task>]``. :class:`STLModel` holds
one such model per task (single-task learning, the baseline of Δm).
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch
from torch import nn

from ..config.backbones import BUILTIN_BACKBONES, require_timm
from ..config.errors import ConfigError
from ..tasks.types import Task

__all__ = ["MTLModel", "STLModel", "build_encoder", "load_weights", "BUILTIN_BACKBONES"]

def _cnn(in_ch: int, width: int, hw: tuple[int, int]) -> tuple[nn.Module, int]:
    w = width
    h, v = hw[0] // 4, hw[1] // 4
    layers = OrderedDict([
        ("conv1", nn.Conv2d(in_ch, w, 3, padding=1)), ("bn1", nn.BatchNorm2d(w)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(w, 2 * w, 3, padding=1)), ("bn2", nn.BatchNorm2d(2 * w)),
        ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(2 * w, 2 * w, 3, padding=1)), ("bn3", nn.BatchNorm2d(2 * w)),
        ("relu3", nn.ReLU()), ("pool3", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(2 * w * h * v, 4 * w)), ("relu4", nn.ReLU()),
    ])
    return nn.Sequential(layers), 4 * w


def _mlp(in_features: int, width: int) -> tuple[nn.Module, int]:
    u = 8 * width
    layers = OrderedDict([("flatten", nn.Flatten()), ("fc1", nn.Linear(in_features, u)),
                          ("relu1", nn.ReLU()), ("fc2", nn.Linear(u, u)), ("relu2", nn.ReLU())])
    return nn.Sequential(layers), u


def _timm(name: str, in_ch: int) -> tuple[nn.Module, int]:
    timm = require_timm(name, BUILTIN_BACKBONES)
    enc = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_ch)
    return enc, int(enc.num_features)


def _check_forward(enc: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """Refuse a timm model that cannot take the data set's inputs (e.g. too small images)."""
    enc.eval()
    try:
        with torch.no_grad():
            enc(torch.zeros(2, *input_shape))
    except RuntimeError as e:
        msg = str(e).splitlines()[0][:160]
        raise ConfigError("--backbone", f"{name!r} cannot take inputs of shape "
                          f"{list(input_shape)} ({msg})") from e
    finally:
        enc.train()


def load_weights(enc: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError("--weights", f"no such file: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is bad input)
        raise ConfigError("--weights", f"cannot read {path}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ConfigError("--weights", f"{path} holds no state dict")
    own = enc.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the encoder's: {tuple(own[k].shape)})" for k, v in sd.items()
             if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if wrong:
        raise ConfigError("--weights", f"{path} does not fit the encoder: wrong shapes "
                          f"{', '.join(wrong[:3])}" + (f" and {len(wrong) - 3} more"
                                                        if len(wrong) > 3 else ""))
    try:
        missing, unexpected = enc.load_state_dict(sd, strict=False)
    except (RuntimeError, TypeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise ConfigError("--weights", f"{path} does not fit the encoder: {msg}") from e
    if missing or unexpected:
        raise ConfigError("--weights", f"{path} does not fit the encoder: missing "
                          f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")


def build_encoder(backbone: str, input_shape: tuple[int, ...], width: int,
                  weights: str | None = None) -> tuple[nn.Module, int]:
    """The encoder named ``backbone`` for inputs ``[C, H, W]`` and its feature width."""
    in_ch = input_shape[0]
    if backbone == "cnn":
        enc, feat = _cnn(in_ch, width, (input_shape[1], input_shape[2]))
    elif backbone == "mlp":
        n = 1
        for s in input_shape:
            n *= s
        enc, feat = _mlp(n, width)
    else:
        enc, feat = _timm(backbone, in_ch)
        _check_forward(enc, backbone, input_shape)
    if weights:
        load_weights(enc, weights)
    return enc, feat


class MTLModel(nn.Module):
    """``encoder`` shared by every task and a Linear head per task; ``forward`` returns
    ``{task: output}``."""

    def __init__(self, encoder: nn.Module, features: int, tasks: list[Task]):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict({t.name: nn.Linear(features, t.n_out) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x)
        return {name: head(h) for name, head in self.heads.items()}


class STLModel(nn.Module):
    """One :class:`MTLModel` with a single head per task (``models[<task>]``), trained side by
    side on the same batches; ``forward`` returns ``{task: output of its own model}``. The
    encoders share nothing."""

    def __init__(self, models: dict[str, MTLModel]):
        super().__init__()
        self.models = nn.ModuleDict(models)

    @property
    def encoder(self) -> nn.Module:
        """The task encoders together (what sparse training masks)."""
        return nn.ModuleList(m.encoder for m in self.models.values())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: m(x)[name] for name, m in self.models.items()}
