"""``digits`` and ``digits-attrs``: multi-task image data built from scikit-learn's digits.

scikit-learn ships 1,797 real handwritten digits (8x8, grey levels 0..16) inside the package
(``sklearn.datasets.load_digits``, no download). From them, in the spirit of Multi-MNIST (Sener &
Koltun, 2018), each sample is a 14x14 composite of two digits: the *left* digit placed at a
random offset in ``[0, 2]^2`` (top left), the *right* one at a random offset in ``[4, 6]^2``
(bottom right); where they overlap the image takes the maximum.

Splits: the 1,797 source digits are split 70 / 15 / 15 % into train / val / test by a
permutation drawn from ``data_seed``, so no handwritten digit appears in two splits. Each split
holds ``pairs_per_image`` composites per source digit of the split: each of them once as the left
digit (in random order) with a random partner from the same split as the right digit.

Tasks:

- ``digits``: ``left`` and ``right`` (10-way classification) and ``sum`` (regression of
  ``left + right``, MAE): 3 tasks, 3 task pairs.
- ``digits-attrs``: 16 binary attributes (CelebA-style), per side ``even``, ``ge5`` (>= 5),
  ``prime``, ``loop`` (0, 6, 8, 9: a closed loop), ``straight`` (1, 4, 7: no curve), and for the
  pair ``sum_ge10``, ``sum_even``, ``left_gt_right``, ``same``, ``sum_prime``, ``diff_ge5``.

Built once per ``(data_seed, pairs_per_image)`` and cached (:mod:`.cache`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..config.errors import ConfigError
from ..tasks.types import Binary, Classification, Regression, Task
from .cache import cached_arrays
from .registry import MTLData, Split

__all__ = ["build_digits", "build_digits_attrs", "composite_arrays", "ATTRIBUTES", "SIZE"]

SIZE = 14
FORMAT = 1            # bump when the arrays change
SPLITS = ("train", "val", "test")
_FRACTIONS = (0.70, 0.15)

_PRIMES = (2, 3, 5, 7, 11, 13, 17)
_SIDE = {"even": lambda d: d % 2 == 0, "ge5": lambda d: d >= 5,
         "prime": lambda d: np.isin(d, _PRIMES), "loop": lambda d: np.isin(d, (0, 6, 8, 9)),
         "straight": lambda d: np.isin(d, (1, 4, 7))}
_PAIR = {"sum_ge10": lambda a, b: a + b >= 10, "sum_even": lambda a, b: (a + b) % 2 == 0,
         "left_gt_right": lambda a, b: a > b, "same": lambda a, b: a == b,
         "sum_prime": lambda a, b: np.isin(a + b, _PRIMES),
         "diff_ge5": lambda a, b: np.abs(a - b) >= 5}
ATTRIBUTES = tuple([f"{s}_{k}" for s in ("left", "right") for k in _SIDE] + list(_PAIR))


def _load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ConfigError("--data", "the digits data sets need scikit-learn: "
                          "pip install gradops[train]") from e
    d = load_digits()
    return d.images.astype(np.uint8), d.target.astype(np.int64)


def composite_arrays(data_seed: int, pairs_per_image: int) -> dict[str, np.ndarray]:
    """The composites of every split as arrays: ``<split>_x`` (uint8 ``[N, 14, 14]``, 0..16),
    ``<split>_left`` / ``_right`` (labels), ``_lsrc`` / ``_rsrc`` (indices into
    ``load_digits()``), ``_lpos`` / ``_rpos`` (``[N, 2]`` row, column of each digit's corner)."""
    images, labels = _load_sklearn_digits()
    rng = np.random.default_rng(data_seed)
    perm = rng.permutation(len(images))
    n_tr = int(round(_FRACTIONS[0] * len(images)))
    n_va = int(round(_FRACTIONS[1] * len(images)))
    parts = {"train": perm[:n_tr], "val": perm[n_tr:n_tr + n_va], "test": perm[n_tr + n_va:]}
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        src = parts[split]
        lsrc = rng.permutation(np.repeat(src, pairs_per_image))
        rsrc = src[rng.integers(0, len(src), size=len(lsrc))]
        lpos = rng.integers(0, 3, size=(len(lsrc), 2))
        rpos = rng.integers(4, 7, size=(len(lsrc), 2))
        x = np.zeros((len(lsrc), SIZE, SIZE), dtype=np.uint8)
        for i in range(len(lsrc)):
            (a, b), (c, d) = lpos[i], rpos[i]
            x[i, a:a + 8, b:b + 8] = images[lsrc[i]]
            np.maximum(x[i, c:c + 8, d:d + 8], images[rsrc[i]], out=x[i, c:c + 8, d:d + 8])
        out.update({f"{split}_x": x, f"{split}_left": labels[lsrc], f"{split}_right": labels[rsrc],
                    f"{split}_lsrc": lsrc, f"{split}_rsrc": rsrc, f"{split}_lpos": lpos,
                    f"{split}_rpos": rpos})
    return out


def _arrays(data_seed: int, pairs_per_image: int) -> dict[str, np.ndarray]:
    return cached_arrays(f"digits_v{FORMAT}_seed{data_seed}_x{pairs_per_image}",
                         lambda: composite_arrays(data_seed, pairs_per_image))


def _images(a: dict[str, np.ndarray], split: str) -> torch.Tensor:
    return torch.from_numpy(a[f"{split}_x"].astype(np.float32) / 16.0).unsqueeze(1)


def build_digits(root: str | None = None, data_seed: int = 0, pairs_per_image: int = 2
                 ) -> MTLData:
    """The ``digits`` data set: tasks ``left``, ``right`` (classification), ``sum`` (regression).
    ``root`` is unused (the source digits ship with scikit-learn)."""
    a = _arrays(data_seed, pairs_per_image)
    tasks: list[Task] = [Classification("left", 10), Classification("right", 10),
                         Regression("sum", offset=9.0, scale=4.0)]
    splits = {}
    for s in SPLITS:
        left = torch.from_numpy(a[f"{s}_left"].astype(np.int64))
        right = torch.from_numpy(a[f"{s}_right"].astype(np.int64))
        splits[s] = Split(_images(a, s), {"left": left, "right": right,
                                          "sum": (left + right).to(torch.float32)})
    return MTLData("digits", tasks, splits)


def attribute_targets(left: np.ndarray, right: np.ndarray) -> dict[str, np.ndarray]:
    """The 16 binary attributes of digit pairs (float32 0/1 arrays, keyed by :data:`ATTRIBUTES`)."""
    out = {}
    for side, d in (("left", left), ("right", right)):
        for k, f in _SIDE.items():
            out[f"{side}_{k}"] = f(d)
    for k, f in _PAIR.items():
        out[k] = f(left, right)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def build_digits_attrs(root: str | None = None, data_seed: int = 0, pairs_per_image: int = 2
                       ) -> MTLData:
    """The ``digits-attrs`` data set: the same composites with 16 binary attribute tasks."""
    a = _arrays(data_seed, pairs_per_image)
    tasks: list[Task] = [Binary(name) for name in ATTRIBUTES]
    splits = {}
    for s in SPLITS:
        t = attribute_targets(a[f"{s}_left"], a[f"{s}_right"])
        splits[s] = Split(_images(a, s), {k: torch.from_numpy(v) for k, v in t.items()})
    return MTLData("digits-attrs", tasks, splits)
