"""Reading MTAN's preprocessed dense data sets: ``root/<split>/<folder>/<i>.npy``.

MTAN (Liu et al., CVPR 2019) distributes NYUv2 and CityScapes as one ``.npy`` file per sample and
target: ``image`` ``HxWx3`` float in [0, 1], a label map ``HxW`` (``-1`` = ignore), ``depth``
``HxWx1`` (0 = no ground truth) and, for NYUv2, ``normal`` ``HxWx3`` (an all-zero vector = no
ground truth). The files are counted by listing ``image/*.npy``. In memory the images, depths and
normals are float32 ``[N, C, H, W]`` and the labels int8 ``[N, H, W]`` (int64 per batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .local_files import bad_file, load_npy, missing_data, numbered_npy, require_dir

__all__ = ["Target", "read_mtan_split"]


@dataclass(frozen=True)
class Target:
    """One target folder: its name, its channels (0: a label map ``HxW``) and, for labels, the
    number of classes (values ``-1 .. classes - 1``)."""

    folder: str
    channels: int
    classes: int = 0


def _check_labels(a: np.ndarray, path: Path, classes: int) -> np.ndarray:
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise bad_file(path, "label map holds non-finite values")
    r = np.rint(a)
    if a.dtype.kind == "f" and not np.array_equal(r, a):
        raise bad_file(path, "label map holds non-integer values")
    lo, hi = float(r.min()), float(r.max())
    if lo < -1 or hi > classes - 1:
        raise bad_file(path, f"label values in [{lo:g}, {hi:g}] (expected -1 = ignore and "
                       f"0..{classes - 1})")
    return r.astype(np.int8)


def read_mtan_split(root: Path, split: str, targets: dict[str, Target], *, data: str,
                    download: str, layout: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Images ``[N, 3, H, W]`` and one tensor per task of ``root/split`` (see the module
    docstring). Missing folders or files raise the one-line :func:`missing_data` error; a file
    of the wrong shape, dtype or values names the file."""
    base = require_dir(root / split, data, root, download, layout)
    img_dir = require_dir(base / "image", data, root, download, layout)
    n = numbered_npy(img_dir)
    if n == 0:
        raise missing_data(data, root, f"no .npy file in {img_dir}", download, layout)
    dirs = {k: require_dir(base / t.folder, data, root, download, layout)
            for k, t in targets.items()}
    first = load_npy(img_dir / "0.npy", (None, None, 3), "f")
    H, W = first.shape[:2]
    x = np.empty((n, 3, H, W), np.float32)
    ys = {k: (np.empty((n, H, W), np.int8) if t.channels == 0 else
              np.empty((n, t.channels, H, W), np.float32)) for k, t in targets.items()}
    for i in range(n):
        a = first if i == 0 else load_npy(img_dir / f"{i}.npy", (H, W, 3), "f")
        x[i] = a.transpose(2, 0, 1)
        for k, t in targets.items():
            path = dirs[k] / f"{i}.npy"
            if not path.is_file():
                raise missing_data(data, root, f"no file {path.relative_to(root)} (there are "
                                   f"{n} images)", download, layout)
            if t.channels == 0:
                ys[k][i] = _check_labels(load_npy(path, (H, W)), path, t.classes)
            else:
                a = load_npy(path, (H, W, t.channels), "f")
                if not np.all(np.isfinite(a)):
                    raise bad_file(path, "holds non-finite values")
                ys[k][i] = a.transpose(2, 0, 1)
    return torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in ys.items()}
