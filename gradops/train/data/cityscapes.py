"""``cityscapes`` and ``cityscapes-19``: CityScapes in MTAN's preprocessed 128x256 form (Liu et
al., CVPR 2019), as Nash-MTL and FAMO train on it.

Layout under ``--data-root``: ``{train,val}/{image,label_7,depth}/{i}.npy`` (2975 train, 500 val):
``image`` ``128x256x3`` float in [0, 1]; ``label_7`` ``128x256``, 7 classes with ``-1`` ignored
(LibMTL's copy names the folder ``label``, also accepted); ``depth`` ``128x256x1``, *inverse*
depth (disparity, about [0, 0.49]) with 0 = invalid. ``cityscapes-19`` reads the 19-class labels
of ``label_19`` instead, when the download has them.

Tasks: ``segmentation`` and ``depth`` (abs and rel error of the disparity, as the papers report
them). Training batches get the standard augmentation (:mod:`.dense_augment`; the disparity is
multiplied by the zoom factor). As for NYUv2, the papers evaluate on the ``val`` split, which is
both ``val`` and ``test`` here.
"""
from __future__ import annotations

from pathlib import Path

from ..tasks.dense import Depth, Segmentation
from .dense_augment import dense_transform
from .local_files import missing_root
from .mtan_layout import Target, read_mtan_split
from .registry import MTLData, Split

__all__ = ["build_cityscapes", "build_cityscapes19"]

DOWNLOAD = "MTAN's preprocessed CityScapes (cityscapes.zip, linked from the MTAN repository)"
_KINDS = {"segmentation": "label", "depth": "inverse_depth"}


def _label_folder(root: Path, classes: int) -> str:
    if classes == 19:
        return "label_19"
    if (root / "train" / "label_7").is_dir() or not (root / "train" / "label").is_dir():
        return "label_7"
    return "label"


def _build(root: str | None, classes: int, augment: bool) -> MTLData:
    name = "cityscapes" if classes == 7 else "cityscapes-19"
    folder = "label_7" if classes == 7 else "label_19"
    layout = f"{{train,val}}/{{image,{folder},depth}}/0.npy, 1.npy, ..."
    if not root or not Path(root).is_dir():
        raise missing_root(name, root, DOWNLOAD, layout)
    r = Path(root)
    targets = {"segmentation": Target(_label_folder(r, classes), 0, classes),
               "depth": Target("depth", 1)}
    tasks = [Segmentation("segmentation", classes), Depth("depth")]
    splits = {}
    for split in ("train", "val"):
        x, ys = read_mtan_split(r, split, targets, data=name, download=DOWNLOAD, layout=layout)
        splits[split] = Split(x, ys, transform=dense_transform(_KINDS, augment=augment))
    splits["test"] = splits["val"]
    return MTLData(name, tasks, splits)


def build_cityscapes(root: str | None, data_seed: int = 0, augment: bool = True) -> MTLData:
    """``cityscapes``: 7-class segmentation and inverse depth (``data_seed`` unused)."""
    return _build(root, 7, augment)


def build_cityscapes19(root: str | None, data_seed: int = 0, augment: bool = True) -> MTLData:
    """``cityscapes-19``: 19-class segmentation (``label_19``) and inverse depth."""
    return _build(root, 19, augment)
