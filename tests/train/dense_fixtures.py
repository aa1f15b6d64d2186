"""Tiny data sets written in the exact on-disk formats the loaders read (MTAN's .npy layout,
CelebA's official files, MNIST's IDX files), with ignore labels, invalid depth and normals."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_mtan(root: Path, n: dict[str, int], hw=(32, 64), classes=13, normals=True,
               label_folder="label", seed=0) -> Path:
    """``root/{split}/{image,<label_folder>,depth[,normal]}/{i}.npy``."""
    rng = np.random.default_rng(seed)
    H, W = hw
    for split, count in n.items():
        for folder in ("image", label_folder, "depth") + (("normal",) if normals else ()):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            np.save(root / split / "image" / f"{i}.npy",
                    rng.random((H, W, 3)).astype(np.float32))
            label = rng.integers(-1, classes, (H, W)).astype(np.float32)   # -1: ignore
            np.save(root / split / label_folder / f"{i}.npy", label)
            depth = rng.uniform(0.5, 5.0, (H, W, 1)).astype(np.float32)
            depth[: H // 4] = 0.0                                           # invalid rows
            np.save(root / split / "depth" / f"{i}.npy", depth)
            if normals:
                v = rng.normal(size=(H, W, 3)).astype(np.float32)
                v /= np.linalg.norm(v, axis=-1, keepdims=True)
                v[:, : W // 4] = 0.0                                        # invalid columns
                np.save(root / split / "normal" / f"{i}.npy", v)
    return root


ATTR_NAMES = ["Smiling", "Male", "Young"]


def write_celeba(root: Path, n=12, seed=0) -> Path:
    """``img_align_celeba/*.jpg``, ``list_attr_celeba.txt``, ``list_eval_partition.txt``."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rows, parts = [], []
    for i in range(1, n + 1):
        name = f"{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (22, 18, 3), dtype=np.uint8)).save(
            root / "img_align_celeba" / name)
        vals = rng.choice([-1, 1], len(ATTR_NAMES))
        rows.append(name + "  " + " ".join(f"{v:2d}" for v in vals))
        parts.append(f"{name} {0 if i <= n // 2 else (1 if i <= 3 * n // 4 else 2)}")
    (root / "list_attr_celeba.txt").write_text(
        f"{n}\n{' '.join(ATTR_NAMES)}\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root


def write_idx(path: Path, a: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    path.write_bytes(header + a.astype(np.uint8).tobytes())


def write_mnist_like(folder: Path, n_train=40, n_test=10, seed=0) -> Path:
    """The four IDX files of an MNIST-like set (28x28 images, labels 0..9)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return folder
