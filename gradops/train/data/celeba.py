"""``celeba``: CelebA's 40 binary face attributes (Liu et al., "Deep Learning Face Attributes in
the Wild", ICCV 2015) from the official files, as FAMO (Liu et al., 2023) trains on them.

Layout under ``--data-root`` (the "Align&Cropped Images" download and its two annotation files):
``img_align_celeba/000001.jpg ...``, ``list_attr_celeba.txt`` (line 1: the number of images,
line 2: the 40 attribute names, then ``000001.jpg  1 -1 ...`` with +1 / -1) and
``list_eval_partition.txt`` (``000001.jpg 0``: 0 train, 1 val, 2 test).

Images are resized to 64x64 (FAMO's size; ``size`` of :func:`build_celeba`) with PIL's bilinear
filter and kept as uint8 ``[N, 3, size, size]``; each batch becomes float in [0, 1] on the device
(``Split.transform``). Built once per (directory, size) and cached (:mod:`.cache`). Tasks: one
:class:`~gradops.train.tasks.dense.Attribute` per attribute, named as in the file.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..tasks.dense import Attribute
from .cache import cached_arrays
from .local_files import bad_file, missing_data, missing_root, root_key
from .registry import MTLData, Split

__all__ = ["build_celeba", "read_annotations", "SIZE"]

SIZE = 64
FORMAT = 1
DOWNLOAD = ("CelebA's Align&Cropped images (img_align_celeba.zip) and the annotation files "
            "list_attr_celeba.txt and list_eval_partition.txt")
LAYOUT = "img_align_celeba/000001.jpg ..., list_attr_celeba.txt, list_eval_partition.txt"
_SPLITS = {0: "train", 1: "val", 2: "test"}


def read_annotations(root: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Attribute names, image file names, attributes (0/1 uint8 ``[N, 40]``) and partition
    (``[N]``: 0 train, 1 val, 2 test) from the two official text files."""
    attr_path, part_path = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    for p in (attr_path, part_path):
        if not p.is_file():
            raise missing_data("celeba", root, f"no file {p.name}", DOWNLOAD, LAYOUT)
    lines = attr_path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise bad_file(attr_path, "line 1 must be the number of images")
    n = int(lines[0])
    names = lines[1].split()
    rows = [ln.split() for ln in lines[2:] if ln.strip()]
    if len(rows) != n:
        raise bad_file(attr_path, f"line 1 says {n} images but {len(rows)} rows follow")
    files = [r[0] for r in rows]
    try:
        attrs = np.array([[int(v) for v in r[1:]] for r in rows], dtype=np.int64)
    except ValueError as e:
        raise bad_file(attr_path, f"attribute values must be 1 or -1 ({e})") from e
    if attrs.ndim != 2 or attrs.shape[1] != len(names) or not np.all(np.isin(attrs, (-1, 1))):
        raise bad_file(attr_path, f"each row must hold a file name and {len(names)} values "
                       "of 1 or -1")
    part = {}
    for ln in part_path.read_text().splitlines():
        if ln.strip():
            f, _, v = ln.partition(" ")
            if v.strip() not in ("0", "1", "2"):
                raise bad_file(part_path, f"partition of {f} must be 0, 1 or 2, got {v!r}")
            part[f] = int(v)
    missing = [f for f in files if f not in part]
    if missing:
        raise bad_file(part_path, f"no partition for {missing[0]} ({len(missing)} images)")
    return names, files, (attrs > 0).astype(np.uint8), np.array([part[f] for f in files])


def _images(root: Path, files: list[str], size: int) -> np.ndarray:
    from PIL import Image
    img_dir = root / "img_align_celeba"
    out = np.empty((len(files), 3, size, size), np.uint8)
    for i, f in enumerate(files):
        p = img_dir / f
        if not p.is_file():
            raise missing_data("celeba", root, f"no image img_align_celeba/{f} (of "
                               f"{len(files)} listed)", DOWNLOAD, LAYOUT)
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        except OSError as e:
            raise bad_file(p, f"not a readable image ({e})") from e
        out[i] = a.transpose(2, 0, 1)
        if i and i % 20000 == 0:
            print(f"gradops: celeba: {i}/{len(files)} images read", file=sys.stderr)
    return out


def _to_float(x: torch.Tensor, targets: Mapping[str, torch.Tensor],
              generator: torch.Generator | None = None):
    return x.to(torch.float32) / 255.0, dict(targets)


def build_celeba(root: str | None, data_seed: int = 0, size: int = SIZE) -> MTLData:
    """The ``celeba`` data set from ``root`` (``data_seed`` unused: the official partition)."""
    if not root or not Path(root).is_dir():
        raise missing_root("celeba", root, DOWNLOAD, LAYOUT)
    r = Path(root)
    if not (r / "img_align_celeba").is_dir():
        raise missing_data("celeba", r, "no directory img_align_celeba/", DOWNLOAD, LAYOUT)
    names, files, attrs, part = read_annotations(r)
    key = root_key(r / "list_attr_celeba.txt", r / "list_eval_partition.txt")

    def build() -> dict[str, np.ndarray]:
        return {"x": _images(r, files, size), "attrs": attrs, "part": part}

    a = cached_arrays(f"celeba_v{FORMAT}_{key}_{size}", build)
    tasks = [Attribute(n) for n in names]
    splits = {}
    for code, split in _SPLITS.items():
        sel = np.nonzero(a["part"] == code)[0]
        if len(sel) == 0:
            raise bad_file(r / "list_eval_partition.txt", f"no image in the {split} partition "
                           f"({code})")
        y = torch.from_numpy(a["attrs"][sel].astype(np.float32))
        splits[split] = Split(torch.from_numpy(a["x"][sel]),
                              {n: y[:, j].contiguous() for j, n in enumerate(names)},
                              transform=_to_float)
    return MTLData("celeba", tasks, splits)
