"""The embedded data sets: shapes, labels of hand-checked samples, disjoint and reproducible
splits, the cache (rebuilt when missing or corrupt), the error without scikit-learn."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from gradops.train.data import cache_dir, load_dataset
from gradops.train.data.digits import ATTRIBUTES, SIZE, attribute_targets, composite_arrays
from gradops.train.config.errors import ConfigError


def test_digits_shapes_and_tasks():
    d = load_dataset("digits")
    assert [t.name for t in d.tasks] == ["left", "right", "sum"]
    sizes = {k: len(s) for k, s in d.splits.items()}
    # 1,797 source digits split 70/15/15 (1258 / 270 / 269), two composites per source digit
    assert sizes == {"train": 2516, "val": 540, "test": 538}
    for s in d.splits.values():
        assert s.x.shape[1:] == (1, SIZE, SIZE) and s.x.dtype == torch.float32
        assert 0.0 <= float(s.x.min()) and float(s.x.max()) <= 1.0
        assert s.targets["left"].dtype == torch.int64
        assert set(s.targets["left"].unique().tolist()) <= set(range(10))
        assert torch.equal(s.targets["sum"], (s.targets["left"] + s.targets["right"]).float())


def test_composites_hold_their_source_digits():
    images = load_digits().images.astype(np.uint8)
    labels = load_digits().target
    a = composite_arrays(0, 2)
    for i in (0, 1, 7, 100):
        canvas = np.zeros((SIZE, SIZE), np.uint8)
        (r, c), (r2, c2) = a["train_lpos"][i], a["train_rpos"][i]
        assert 0 <= r <= 2 and 0 <= c <= 2 and 4 <= r2 <= 6 and 4 <= c2 <= 6
        canvas[r:r + 8, c:c + 8] = images[a["train_lsrc"][i]]
        canvas[r2:r2 + 8, c2:c2 + 8] = np.maximum(canvas[r2:r2 + 8, c2:c2 + 8],
                                                  images[a["train_rsrc"][i]])
        assert np.array_equal(a["train_x"][i], canvas)
        assert a["train_left"][i] == labels[a["train_lsrc"][i]]
        assert a["train_right"][i] == labels[a["train_rsrc"][i]]
    # sample 0 by hand: its label is the digit drawn at its left position
    d = load_dataset("digits")
    left0 = int(d.splits["train"].targets["left"][0])
    assert left0 == int(labels[a["train_lsrc"][0]])


def test_attribute_targets_by_hand():
    t = attribute_targets(np.array([3, 8, 0]), np.array([8, 8, 7]))
    assert len(ATTRIBUTES) == 16 and set(t) == set(ATTRIBUTES)
    # 3 | 8: left odd, < 5, prime, no loop, curved; right even, >= 5, not prime, loop
    expect_3_8 = {"left_even": 0, "left_ge5": 0, "left_prime": 1, "left_loop": 0,
                  "left_straight": 0, "right_even": 1, "right_ge5": 1, "right_prime": 0,
                  "right_loop": 1, "right_straight": 0, "sum_ge10": 1, "sum_even": 0,
                  "left_gt_right": 0, "same": 0, "sum_prime": 1, "diff_ge5": 1}
    assert {k: int(v[0]) for k, v in t.items()} == expect_3_8
    assert t["same"][1] == 1 and t["left_gt_right"][1] == 0 and t["sum_even"][1] == 1
    assert t["right_straight"][2] == 1 and t["left_loop"][2] == 1 and t["diff_ge5"][2] == 1
    d = load_dataset("digits-attrs")
    assert len(d.tasks) == 16
    tr = d.splits["train"]
    base = load_dataset("digits").splits["train"].targets
    ref = attribute_targets(base["left"].numpy(), base["right"].numpy())
    for k in ATTRIBUTES:
        assert torch.equal(tr.targets[k], torch.from_numpy(ref[k]))


def test_splits_are_disjoint_and_reproducible():
    a = composite_arrays(0, 2)
    src = {s: set(a[f"{s}_lsrc"]) | set(a[f"{s}_rsrc"]) for s in ("train", "val", "test")}
    assert not (src["train"] & src["val"]) and not (src["train"] & src["test"])
    assert not (src["val"] & src["test"])
    assert len(src["train"] | src["val"] | src["test"]) == 1797
    b = composite_arrays(0, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = composite_arrays(1, 2)
    assert not np.array_equal(a["train_lsrc"], c["train_lsrc"])


def test_cache_is_rebuilt_when_missing_or_corrupt(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADOPS_DATA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    first = load_dataset("digits")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["digits_v1_seed0_x2.npz", "digits_v1_seed0_x2.npz.sha256"]
    path = tmp_path / files[0]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                      # flip a byte in the middle
    path.write_bytes(bytes(raw))
    again = load_dataset("digits")
    assert "corrupt" in capsys.readouterr().err
    assert torch.equal(again.splits["train"].x, first.splits["train"].x)
    assert path.read_bytes() != bytes(raw)           # rewritten
    path.write_bytes(path.read_bytes()[:100])        # truncated
    assert torch.equal(load_dataset("digits").splits["test"].x, first.splits["test"].x)
    (tmp_path / files[1]).unlink()                   # checksum missing
    assert torch.equal(load_dataset("digits").splits["val"].x, first.splits["val"].x)
    assert (tmp_path / files[1]).exists()


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADOPS_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "gradops"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(cache_dir()) == os.path.join(os.path.expanduser("~"), ".cache", "gradops")


def test_without_scikit_learn_gradops_imports_and_the_error_says_what_to_install():
    code = ("import sys; sys.modules['sklearn'] = None; sys.modules['sklearn.datasets'] = None\n"
            "import gradops, gradops.train, gradops.cli\n"
            "from gradops.train.data.digits import composite_arrays\n"
            "try:\n    composite_arrays(0, 2)\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ConfigError" in out.stdout and "pip install gradops[train]" in out.stdout


def test_unknown_data_set_names_the_choices():
    with pytest.raises(ConfigError, match=r"--data: unknown data set 'nyu'.*digits, digits-attrs"):
        load_dataset("nyu")
