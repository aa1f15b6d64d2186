"""Package-level behaviour: the build, the backend report, segment tables, the examples. The CLI's
`info` and `bench` are tested in tests/cli/, the benchmarks' contenders in tests/bench/."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradops
from gradops import _backend

ROOT = Path(__file__).resolve().parents[1]


def test_extension_built_unless_skipped():
    if os.environ.get("GRADOPS_NO_EXT") == "1":
        pytest.skip("GRADOPS_NO_EXT=1: extension build skipped on purpose")
    assert _backend.ext_available(), _backend.EXT_ERROR


def test_cuda_kernels_compiled_when_toolchain_present():
    """CI has nvcc but no GPU: the CUDA kernels must still have been compiled in."""
    if os.environ.get("GRADOPS_NO_EXT") == "1" or os.environ.get("GRADOPS_NO_CUDA") == "1":
        pytest.skip("extension or CUDA build skipped on purpose")
    import shutil
    if shutil.which("nvcc") is None or torch.version.cuda is None:
        pytest.skip("no CUDA toolchain (nvcc) or a CPU-only torch: CUDA kernels not expected")
    assert _backend.cuda_ext_available(), "nvcc is present but gradops._C has no CUDA kernels"


def test_info_reports_every_op_and_device():
    r = gradops.info()
    assert {"gram", "segment_gram"} <= set(r["ops"])
    cpu = r["ops"]["gram"]["cpu"]
    assert "torch" in cpu["live"]
    assert cpu["default"] == ("cpp" if _backend.ext_available() else "torch")
    if _backend.triton_interpret():
        assert "triton" in cpu["live"]
    text = gradops.format_info(r)
    assert "gram" in text and "segment_gram" in text and "extension gradops._C" in text


def test_offsets_from_numels():
    o = gradops.offsets_from_numels([3, 0, 5])
    assert o.tolist() == [0, 3, 3, 8] and o.dtype == torch.int64
    with pytest.raises(ValueError, match="at least one"):
        gradops.offsets_from_numels([])
    with pytest.raises(ValueError, match=">= 0"):
        gradops.offsets_from_numels([2, -1])


@pytest.mark.parametrize("script,args", [("ops_quickstart.py", []),
                                         ("mtl_training.py", ["--T", "3", "--steps", "40"])])
def test_examples_run(script, args):
    path = Path(__file__).resolve().parent.parent / "examples" / script
    res = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    if script == "mtl_training.py":                 # both modes train, to the same losses
        lines = [l for l in res.stdout.splitlines() if l.startswith("linear_gram=")]
        assert len(lines) == 2
        ends = [float(l.split("->")[1].split()[0]) for l in lines]
        starts = [float(l.split("loss")[1].split("->")[0]) for l in lines]
        assert ends[0] < 0.5 * starts[0] and abs(ends[0] - ends[1]) <= 1e-3 + 1e-2 * ends[1]
    else:
        assert "cosine" in res.stdout
