"""Per-batch conversion and augmentation of dense-prediction batches (NYUv2, CityScapes).

The standard augmentation of MTAN's NYUv2 pipeline as Nash-MTL and FAMO run it (Liu et al.,
"End-to-End Multi-Task Learning with Attention", CVPR 2019; Navon et al., "Multi-Task Learning as
a Bargaining Game", ICML 2022): per sample, a scale ``s`` drawn from ``(1.0, 1.2, 1.5)``, a crop of
``(int(H / s), int(W / s))`` at a uniformly drawn position, resized back to ``(H, W)``, then a
horizontal flip with probability 1/2. The same crop and flip are applied to the image and every
target:

- the image: bilinear resize (``align_corners=True``, as the published code);
- segmentation labels: nearest (the ignore label ``-1`` stays exact);
- depth: nearest, divided by ``s`` (zooming in by ``s`` brings the scene ``s`` times closer);
  inverse depth (CityScapes' disparity) is multiplied by ``s`` instead (the published code divides
  it too, which is the depth rule applied to disparity);
- normals: nearest (the all-zero vectors that mark missing ground truth stay exact; the published
  code resizes them bilinearly, blending invalid and valid vectors at the borders), and on a flip
  the x component is negated.

The random draws come from the ``torch.Generator`` the training loop passes for each batch (CPU);
the work is done on the batch's device. Without a generator (evaluation) batches are only
converted (labels to int64).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["SCALES", "KINDS", "dense_transform", "scale_crop_flip"]

SCALES = (1.0, 1.2, 1.5)
#: What a target is, which decides how it is resized, rescaled and flipped.
KINDS = ("label", "depth", "inverse_depth", "normal")


def _crop_resize(t: torch.Tensor, i: int, j: int, h: int, w: int, mode: str) -> torch.Tensor:
    H, W = t.shape[-2:]
    c = t[None, :, i:i + h, j:j + w]
    if mode == "bilinear":
        return F.interpolate(c, size=(H, W), mode="bilinear", align_corners=True)[0]
    return F.interpolate(c, size=(H, W), mode="nearest")[0]


def scale_crop_flip(x: torch.Tensor, targets: Mapping[str, torch.Tensor],
                    kinds: Mapping[str, str], generator: torch.Generator,
                    scales: tuple[float, ...] = SCALES, flip: bool = True
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The augmented batch (see the module docstring). ``x``: ``[B, C, H, W]`` float; targets
    ``[B, H, W]`` (labels) or ``[B, C, H, W]``, each with its kind in ``kinds``."""
    for name in targets:
        if kinds.get(name) not in KINDS:
            raise ValueError(f"scale_crop_flip: target {name!r} has kind {kinds.get(name)!r}; "
                             f"valid: {', '.join(KINDS)}")
    B, _, H, W = x.shape
    s_idx = torch.randint(len(scales), (B,), generator=generator).tolist()
    u = torch.rand(B, 2, generator=generator).tolist()
    flips = (torch.rand(B, generator=generator) < 0.5).tolist() if flip else [False] * B
    xs, ys = [], {k: [] for k in targets}
    for b in range(B):
        s = scales[s_idx[b]]
        h, w = int(H / s), int(W / s)
        i, j = min(int(u[b][0] * (H - h + 1)), H - h), min(int(u[b][1] * (W - w + 1)), W - w)
        img = _crop_resize(x[b], i, j, h, w, "bilinear")
        if flips[b]:
            img = img.flip(-1)
        xs.append(img)
        for name, t in targets.items():
            kind = kinds[name]
            if kind == "label":
                v = _crop_resize(t[b][None].to(torch.float32), i, j, h, w, "nearest")[0]
                v = v.to(t.dtype)
            else:
                v = _crop_resize(t[b], i, j, h, w, "nearest")
                if kind == "depth":
                    v = v / s
                elif kind == "inverse_depth":
                    v = v * s
            if flips[b]:
                v = v.flip(-1)
                if kind == "normal":
                    v = torch.cat([-v[:1], v[1:]])
            ys[name].append(v)
    return torch.stack(xs), {k: torch.stack(v) for k, v in ys.items()}


def dense_transform(kinds: Mapping[str, str], augment: bool = True
                    ) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The ``Split.transform`` of a dense data set: ``transform(x, targets, generator)``.
    Labels (stored compactly) become int64; with a generator and ``augment``, the batch is
    augmented with :func:`scale_crop_flip`."""
    kinds = dict(kinds)

    def transform(x: torch.Tensor, targets: Mapping[str, torch.Tensor],
                  generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if generator is not None and augment:
            x, targets = scale_crop_flip(x, targets, kinds, generator)
        out = {k: (v.long() if kinds[k] == "label" else v) for k, v in targets.items()}
        return x, out

    return transform
