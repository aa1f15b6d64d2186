"""``multi-mnist``, ``multi-fashion``, ``multi-fashion-mnist``: two overlapping items per image,
one task per item (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018; the Fashion variants as in Lin et al., "Pareto Multi-Task Learning", NeurIPS 2019,
and Recon, Shi et al., ICLR 2023), built from the local IDX files of MNIST / Fashion-MNIST.

Construction (that of the published Multi-MNIST code): on a 36x36 canvas the *left* item goes to
rows / columns ``[0:28, 0:28]``, the *right* one to ``[6:34, 6:34]``, the pixel-wise maximum
where they overlap; ``multi-mnist`` and ``multi-fashion`` resize the canvas to 28x28 (nearest
neighbour, PIL's rule: source index ``floor((i + 0.5) * 36 / 28)``). Every source image is the
left item once, with a right partner drawn uniformly from the same split.

- ``multi-mnist`` (MNIST) and ``multi-fashion`` (Fashion-MNIST): 28x28. MNIST's 60,000 training
  images are split by ``data_seed`` into 54,000 train and 6,000 val sources (the papers have no
  val split); the 10,000 test images give the test split.
- ``multi-fashion-mnist`` (Multi-(Fashion+MNIST)): 36x36, kept at full size (as Recon uses it);
  each MNIST image is the left item with a Fashion-MNIST partner and each Fashion-MNIST image the
  left item with an MNIST partner, so 120,000 training and 20,000 test composites (train / val
  split by sources as above: 108,000 / 12,000). Labels are each item's class in its own set.

Tasks: ``left`` and ``right``, 10-way classification each. Images are kept as uint8 (float in
[0, 1] per batch). Built once per (source files, ``data_seed``) and cached (:mod:`.cache`).

Layout under ``--data-root``: the four IDX files ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (optionally
``.gz``) in ``mnist/`` (or torchvision's ``MNIST/raw/``) and ``fashion/`` (or
``FashionMNIST/raw/``); ``multi-mnist`` and ``multi-fashion`` also accept them directly in the
root.
"""
from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..tasks.types import Classification
from .cache import cached_arrays
from .local_files import bad_file, missing_data, missing_root, root_key
from .registry import MTLData, Split

__all__ = ["build_multi_mnist", "build_multi_fashion", "build_multi_fashion_mnist",
           "compose", "read_idx", "find_source"]

FORMAT = 1
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
_DIRS = {"mnist": ("mnist", "MNIST/raw"), "fashion": ("fashion", "FashionMNIST/raw")}
_DOWNLOAD = {"mnist": "MNIST's four IDX files (yann.lecun.com/exdb/mnist or torchvision's "
                      "MNIST mirror)",
             "fashion": "Fashion-MNIST's four IDX files (github.com/zalandoresearch/"
                        "fashion-mnist)"}
VAL_FRACTION = 0.1


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 IDX array (``ndim`` 3: images ``[N, 28, 28]``, 1: labels ``[N]``); the file may
    be gzip-compressed. A malformed file is an error that names it."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise bad_file(path, f"not a readable gzip file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise bad_file(path, f"not an IDX file of unsigned bytes with {ndim} dimension(s) "
                       f"(magic {raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})")
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(np.int64)
    want = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != want:
        raise bad_file(path, f"holds {len(raw)} bytes, its header ({'x'.join(map(str, dims))})"
                       f" says {want}")
    if ndim == 3 and tuple(dims[1:]) != (28, 28):
        raise bad_file(path, f"images of {dims[1]}x{dims[2]} (expected 28x28)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(tuple(dims))


def _file(d: Path, name: str) -> Path | None:
    for cand in (d / name, d / (name + ".gz")):
        if cand.is_file():
            return cand
    return None


def find_source(root: Path, source: str, data: str, allow_root: bool) -> list[Path]:
    """The four IDX files of ``source`` (``mnist`` or ``fashion``) under ``root``."""
    dirs = [root / d for d in _DIRS[source]] + ([root] if allow_root else [])
    for d in dirs:
        files = [_file(d, n) for n in IDX_FILES]
        if all(files):
            return files  # type: ignore[return-value]
    for d in dirs:        # a directory with some of the files: name the first missing one
        files = [_file(d, n) for n in IDX_FILES]
        if any(files):
            miss = IDX_FILES[files.index(None)]
            raise missing_data(data, root, f"no file {miss} (or {miss}.gz) in {d}",
                               _DOWNLOAD[source], f"{_DIRS[source][0]}/{miss} and the other "
                               f"three ({', '.join(IDX_FILES)})")
    where = " or ".join(f"{d}/" for d in _DIRS[source]) + (" or the root" if allow_root else "")
    raise missing_data(data, root, f"no {source} IDX files ({where})", _DOWNLOAD[source],
                       f"{_DIRS[source][0]}/{{{', '.join(IDX_FILES)}}}")


def _read_source(files: list[Path]) -> dict[str, np.ndarray]:
    out = {"train_x": read_idx(files[0], 3), "train_y": read_idx(files[1], 1),
           "test_x": read_idx(files[2], 3), "test_y": read_idx(files[3], 1)}
    for s in ("train", "test"):
        if len(out[f"{s}_x"]) != len(out[f"{s}_y"]):
            raise bad_file(files[0 if s == "train" else 2], f"{len(out[f'{s}_x'])} images but "
                           f"{len(out[f'{s}_y'])} labels in the matching labels file")
    return out


def compose(left: np.ndarray, right: np.ndarray, size: int = 28) -> np.ndarray:
    """The composites ``[N, size, size]`` uint8 of ``left`` and ``right`` ``[N, 28, 28]`` (see
    the module docstring); ``size`` 28 (nearest resize) or 36 (the canvas)."""
    n = len(left)
    canvas = np.zeros((n, 36, 36), np.uint8)
    canvas[:, 0:28, 0:28] = left
    canvas[:, 6:34, 6:34] = np.maximum(canvas[:, 6:34, 6:34], right)
    if size == 36:
        return canvas
    if size != 28:
        raise ValueError(f"compose: size must be 28 or 36, got {size}")
    idx = np.floor((np.arange(28) + 0.5) * 36 / 28).astype(np.int64)
    return canvas[:, idx][:, :, idx]


def _pairs(rng, lx, ly, rx, ry, size):
    partner = rng.integers(0, len(rx), size=len(lx))
    return compose(lx, rx[partner], size), ly.astype(np.int64), ry[partner].astype(np.int64)


def _arrays(srcs: dict[str, dict[str, np.ndarray]], kind: str, data_seed: int
            ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(data_seed)
    parts: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for name, a in srcs.items():
        perm = rng.permutation(len(a["train_x"]))
        n_val = int(round(VAL_FRACTION * len(perm)))
        tr, va = np.sort(perm[n_val:]), np.sort(perm[:n_val])
        parts[name] = {"train": (a["train_x"][tr], a["train_y"][tr]),
                       "val": (a["train_x"][va], a["train_y"][va]),
                       "test": (a["test_x"], a["test_y"])}
    out = {}
    for split in ("train", "val", "test"):
        if kind == "multi-fashion-mnist":
            m, f = parts["mnist"][split], parts["fashion"][split]
            xs, ls, rs = zip(_pairs(rng, *m, *f, 36), _pairs(rng, *f, *m, 36))
            x, left, right = np.concatenate(xs), np.concatenate(ls), np.concatenate(rs)
        else:
            s = parts[next(iter(parts))][split]
            x, left, right = _pairs(rng, *s, *s, 28)
        out.update({f"{split}_x": x, f"{split}_left": left, f"{split}_right": right})
    return out


def _to_float(x: torch.Tensor, targets: Mapping[str, torch.Tensor],
              generator: torch.Generator | None = None):
    return x.to(torch.float32) / 255.0, dict(targets)


def _build(kind: str, root: str | None, data_seed: int) -> MTLData:
    sources = {"multi-mnist": ("mnist",), "multi-fashion": ("fashion",),
               "multi-fashion-mnist": ("mnist", "fashion")}[kind]
    if not root or not Path(root).is_dir():
        raise missing_root(kind, root, " and ".join(_DOWNLOAD[s] for s in sources),
                           " and ".join(f"{_DIRS[s][0]}/{{{', '.join(IDX_FILES)}}}"
                                        for s in sources))
    r = Path(root)
    files = {s: find_source(r, s, kind, allow_root=len(sources) == 1) for s in sources}
    key = root_key(*[p for fs in files.values() for p in fs])
    a = cached_arrays(f"{kind}_v{FORMAT}_{key}_seed{data_seed}",
                      lambda: _arrays({s: _read_source(f) for s, f in files.items()}, kind,
                                      data_seed))
    tasks = [Classification("left", 10), Classification("right", 10)]
    splits = {s: Split(torch.from_numpy(a[f"{s}_x"]).unsqueeze(1),
                       {"left": torch.from_numpy(a[f"{s}_left"]),
                        "right": torch.from_numpy(a[f"{s}_right"])}, transform=_to_float)
              for s in ("train", "val", "test")}
    return MTLData(kind, tasks, splits)


def build_multi_mnist(root: str | None, data_seed: int = 0) -> MTLData:
    """``multi-mnist``: two MNIST digits per 28x28 image."""
    return _build("multi-mnist", root, data_seed)


def build_multi_fashion(root: str | None, data_seed: int = 0) -> MTLData:
    """``multi-fashion``: two Fashion-MNIST items per 28x28 image."""
    return _build("multi-fashion", root, data_seed)


def build_multi_fashion_mnist(root: str | None, data_seed: int = 0) -> MTLData:
    """``multi-fashion-mnist``: an MNIST digit and a Fashion-MNIST item per 36x36 image."""
    return _build("multi-fashion-mnist", root, data_seed)
