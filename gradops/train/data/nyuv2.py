"""``nyuv2``: NYU Depth V2 in MTAN's preprocessed form (Liu et al., "End-to-End Multi-Task
Learning with Attention", CVPR 2019), the version LibMTL, Nash-MTL and FAMO train on.

Layout under ``--data-root``: ``{train,val}/{image,label,depth,normal}/{i}.npy``, i = 0..N-1
(795 train, 654 val samples of 288x384): ``image`` ``HxWx3`` float in [0, 1], ``label`` ``HxW``
13 classes ``0..12`` with ``-1`` ignored, ``depth`` ``HxWx1`` in metres with 0 = invalid,
``normal`` ``HxWx3`` in [-1, 1] with an all-zero vector = invalid.

Tasks: ``segmentation`` (:class:`~gradops.train.tasks.dense.Segmentation`, 13 classes),
``depth`` (:class:`~gradops.train.tasks.dense.Depth`), ``normal``
(:class:`~gradops.train.tasks.dense.Normals`). Training batches get the standard augmentation
(:mod:`.dense_augment`: random scale-crop and horizontal flip, consistent over every target).

The published protocol has no separate validation set: the papers evaluate on the 654 ``val``
samples and select or average epochs on them. Here ``val`` and ``test`` are both that split (one
object), so "best on val" is best on the reported split: an optimistic choice, which is why the
report also gives the last-10-epoch average.
"""
from __future__ import annotations

from pathlib import Path

from ..tasks.dense import Depth, Normals, Segmentation
from .dense_augment import dense_transform
from .local_files import missing_root
from .mtan_layout import Target, read_mtan_split
from .registry import MTLData, Split

__all__ = ["build_nyuv2", "CLASSES"]

CLASSES = 13
DOWNLOAD = "MTAN's preprocessed NYUv2 (nyuv2.zip, linked from the MTAN repository's README)"
LAYOUT = "{train,val}/{image,label,depth,normal}/0.npy, 1.npy, ..."
_TARGETS = {"segmentation": Target("label", 0, CLASSES), "depth": Target("depth", 1),
            "normal": Target("normal", 3)}
_KINDS = {"segmentation": "label", "depth": "depth", "normal": "normal"}


def build_nyuv2(root: str | None, data_seed: int = 0, augment: bool = True) -> MTLData:
    """The ``nyuv2`` data set read from ``root`` (``data_seed`` is unused: the splits are
    fixed). ``augment``: the standard augmentation of training batches."""
    if not root or not Path(root).is_dir():
        raise missing_root("nyuv2", root, DOWNLOAD, LAYOUT)
    r = Path(root)
    tasks = [Segmentation("segmentation", CLASSES), Depth("depth"), Normals("normal")]
    splits = {}
    for name in ("train", "val"):
        x, ys = read_mtan_split(r, name, _TARGETS, data="nyuv2", download=DOWNLOAD,
                                layout=LAYOUT)
        splits[name] = Split(x, ys, transform=dense_transform(_KINDS, augment=augment))
    splits["test"] = splits["val"]
    return MTLData("nyuv2", tasks, splits)
