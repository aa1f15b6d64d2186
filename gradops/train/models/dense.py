"""Models for dense prediction: a shared encoder that keeps a spatial map and one light decoder
per task (segmentation, depth, normals), with every layer a named module (per-layer statistics,
sparse masks and Recon's branching address layers by name).

Encoders (``--backbone``):

- ``segnet``: the SegNet encoder-decoder of MTAN's code (Badrinarayanan et al., 2017, as used by
  Liu et al., "End-to-End Multi-Task Learning with Attention", CVPR 2019): five encoder stages of
  3x3 conv + BatchNorm + ReLU layers (widths ``w * (1, 2, 4, 8, 8)``; 2, 2, 3, 3, 3 layers),
  each followed by a 2x2 max-pool that keeps its indices, and the mirrored decoder with max
  unpooling, back to full resolution with ``w`` channels. ``--width 64`` is MTAN's size (about
  25 M parameters). MTAN's task-specific attention modules are *not* part of it: this is the
  "split" SegNet of MTAN's code, a hard-sharing baseline, so its numbers are not the papers'
  SegNet-MTAN numbers.
- ``resnet-dilated``: a small ResNet-style dilated backbone: a stride-2 stem, four stages of two
  basic residual blocks (widths ``w, 2w, 4w, 8w``; the second stage strides 2, the third and
  fourth dilate by 2 and 4 instead of striding), output stride 4.
- any timm model name: ``timm.create_model(name, features_only=True, pretrained=False)``, its
  last feature map (random init, or ``--weights``).

Decoders (``heads[<task>]``): for ``segnet`` MTAN's two convolutions (3x3 ``w -> w``, then 1x1
to the task's channels); for the others 3x3 conv + BatchNorm + ReLU then 1x1, with a bilinear
upsampling of the output to the input's size.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config.backbones import DENSE_BACKBONES
from ..config.errors import ConfigError
from ..tasks.types import Task

__all__ = ["DENSE_BACKBONES", "DenseMTLModel", "SegNet", "DilatedResNet", "build_dense_encoder"]



def _conv_bn_relu(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)),
        ("bn", nn.BatchNorm2d(cout)), ("relu", nn.ReLU(inplace=True))]))


class SegNet(nn.Module):
    """MTAN's SegNet encoder-decoder without attention (see the module docstring); ``forward``
    returns the full-resolution feature map ``[B, w, H, W]`` (H, W divisible by 32)."""

    def __init__(self, in_ch: int = 3, width: int = 64):
        super().__init__()
        f = [width * m for m in (1, 2, 4, 8, 8)]
        n_layers = (2, 2, 3, 3, 3)
        self.enc = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i, n in enumerate(n_layers):
            cin = in_ch if i == 0 else f[i - 1]
            self.enc.append(nn.Sequential(OrderedDict(
                [(f"layer{k}", _conv_bn_relu(cin if k == 0 else f[i], f[i])) for k in range(n)])))
            # decoder stage i maps f[i] back to f[i - 1] (stage 0 keeps f[0])
            cout = f[max(i - 1, 0)]
            self.dec.append(nn.Sequential(OrderedDict(
                [(f"layer{k}", _conv_bn_relu(f[i], f[i] if k < n - 1 else cout))
                 for k in range(n)])))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.out_channels = f[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"SegNet: input height and width must be multiples of 32, got "
                             f"{list(x.shape[-2:])}")
        indices, sizes = [], []
        for stage in self.enc:
            x = stage(x)
            sizes.append(x.shape)
            x, idx = self.pool(x)
            indices.append(idx)
        for i in reversed(range(len(self.dec))):
            x = self.unpool(x, indices[i], output_size=sizes[i])
            x = self.dec[i](x)
        return x


class _Block(nn.Module):
    """A basic residual block (two 3x3 conv + BatchNorm, ReLU, a 1x1 projection when needed)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(cin, cout, 1, stride, bias=False)),
                ("bn", nn.BatchNorm2d(cout))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.proj is None else self.proj(x)))


class DilatedResNet(nn.Module):
    """A small dilated ResNet (see the module docstring): ``[B, 8w, H/4, W/4]`` features."""

    def __init__(self, in_ch: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.stem = _conv_bn_relu(in_ch, w)
        self.stem.conv.stride = (2, 2)
        spec = [(w, w, 1, 1), (w, 2 * w, 2, 1), (2 * w, 4 * w, 1, 2), (4 * w, 8 * w, 1, 4)]
        for i, (cin, cout, stride, dil) in enumerate(spec, 1):
            setattr(self, f"layer{i}", nn.Sequential(OrderedDict([
                ("block1", _Block(cin, cout, stride, dil)),
                ("block2", _Block(cout, cout, 1, dil))])))
        self.out_channels = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


class _TimmFeatures(nn.Module):
    """A timm model built with ``features_only=True``; ``forward`` returns its last map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.body = model
        self.out_channels = int(model.feature_info.channels()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]


def _timm_features(name: str, in_ch: int) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise ConfigError("--backbone", f"{name!r} is not built in and timm is not installed",
                          DENSE_BACKBONES) from e
    if not timm.is_model(name):
        raise ConfigError("--backbone", f"unknown backbone {name!r}",
                          list(DENSE_BACKBONES) + ["a timm model name (timm.list_models())"])
    try:
        model = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_ch)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError("--backbone", f"{name!r} has no features_only form ({e})") from e
    return _TimmFeatures(model)


def build_dense_encoder(backbone: str, in_ch: int, width: int) -> nn.Module:
    """The dense encoder named ``backbone`` (it has ``out_channels``)."""
    if backbone == "segnet":
        return SegNet(in_ch, width)
    if backbone == "resnet-dilated":
        return DilatedResNet(in_ch, width)
    if backbone in ("cnn", "mlp"):
        raise ConfigError("--backbone", f"{backbone!r} flattens its input; dense tasks "
                          "(segmentation, depth, normals) need a dense backbone",
                          list(DENSE_BACKBONES) + ["a timm model name"])
    return _timm_features(backbone, in_ch)


def _head(kind: str, cin: int, n_out: int) -> nn.Sequential:
    if kind == "segnet":
        return nn.Sequential(OrderedDict([("conv1", nn.Conv2d(cin, cin, 3, padding=1)),
                                          ("conv2", nn.Conv2d(cin, n_out, 1))]))
    hidden = max(cin // 2, 8)
    return nn.Sequential(OrderedDict([("conv1", nn.Conv2d(cin, hidden, 3, padding=1)),
                                      ("bn1", nn.BatchNorm2d(hidden)),
                                      ("relu1", nn.ReLU(inplace=True)),
                                      ("conv2", nn.Conv2d(hidden, n_out, 1))]))


class DenseMTLModel(nn.Module):
    """``encoder`` shared by every task and a decoder per task in ``heads``; ``forward``
    returns ``{task: [B, n_out, H, W]}`` at the input's resolution."""

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], head_kind: str = "conv"):
        super().__init__()
        self.encoder = encoder
        c = int(encoder.out_channels)
        self.heads = nn.ModuleDict({t.name: _head(head_kind, c, t.n_out) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x)
        out = {}
        for name, head in self.heads.items():
            y = head(h)
            if y.shape[-2:] != x.shape[-2:]:
                y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out[name] = y
        return out
