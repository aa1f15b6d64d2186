"""Package-level behaviour: the build, backend report, CLI, segment tables, the quick peers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradops
from gradops import _backend
from gradops.bench import peers
from gradops.bench.gram import equal_offsets

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


def test_cli_info_and_bench(tmp_path):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "gradops", "info"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "segment_gram" in out
    csv_path = tmp_path / "bench.csv"
    out = subprocess.run([sys.executable, "-m", "gradops", "bench", "--suite", "gram", "--T", "2,3",
                          "--P", "5000", "--segments", "7", "--rounds", "3",
                          "--csv", str(csv_path)],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "| gram | gradops | 2 |" in out and "| segment_gram | gradops | 3 |" in out
    lines = csv_path.read_text().strip().splitlines()
    assert lines[0].startswith("date,device_name,torch,triton,gradops,git_rev,omp_wait_policy,"
                               "op,impl,T,P,L,dtype,device,ms")
    assert len(lines) == 1 + 2 * 8
    row = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert row["torch"] == torch.__version__ and row["gradops"] == gradops.__version__
    assert row["date"].count("-") == 2 and row["device_name"].startswith("cpu")
    # --append adds one more run's rows under the same header; a file of other columns is refused
    subprocess.run([sys.executable, "-m", "gradops", "bench", "--suite", "gram", "--T", "2",
                    "--P", "999", "--segments", "3", "--rounds", "3", "--csv", str(csv_path),
                    "--append"], capture_output=True, text=True, env=env, check=True)
    assert len(csv_path.read_text().strip().splitlines()) == 1 + 3 * 8
    from gradops.bench.report import write_csv
    with pytest.raises(ValueError, match="has columns"):
        write_csv([{"other": 1}], str(csv_path), append=True)
    out = subprocess.run([sys.executable, "-m", "gradops", "bench", "--suite", "methods",
                          "--T", "3",
                          "--P", "5000", "--rounds", "3"],
                         capture_output=True, text=True, env=env, check=True).stdout
    for op in ("combine", "pcgrad", "graddrop"):
        assert f"| {op} | gradops | 3 |" in out


def test_method_peers_compute_the_same_thing():
    J = torch.randn(3, 500)
    perms = gradops.random_orders(3, generator=torch.Generator().manual_seed(0))
    from gradops.reference import pcgrad_reference
    assert torch.allclose(gradops.pcgrad(J, perms=perms), pcgrad_reference(J, perms), atol=1e-4)
    jd = peers.torchjd_aggregators()
    if jd:  # TorchJD's PCGrad uses its own random orders: T = 2 does not depend on them
        J2 = torch.randn(2, 500)
        assert torch.allclose(jd["pcgrad"](J2), gradops.pcgrad(J2), atol=1e-4)
    assert peers.torch_graddrop(J).shape == (500,)


def test_bench_peers_compute_the_same_thing():
    J = torch.randn(4, 999)
    offsets = equal_offsets(999, 10)
    assert offsets.tolist()[-1] == 999 and len(offsets) == 11
    G = gradops.gram(J)
    for peer in (peers.matmul_gram, peers.pair_loop_gram):
        assert torch.allclose(peer(J), G, atol=1e-4)
    Gl = gradops.segment_gram(J, offsets)
    for peer in (peers.segment_matmul_loop, peers.segment_pair_loop):
        assert torch.allclose(peer(J, offsets), Gl, atol=1e-4)


def test_offsets_from_numels():
    o = gradops.offsets_from_numels([3, 0, 5])
    assert o.tolist() == [0, 3, 3, 8] and o.dtype == torch.int64
    with pytest.raises(ValueError, match="at least one"):
        gradops.offsets_from_numels([])
    with pytest.raises(ValueError, match=">= 0"):
        gradops.offsets_from_numels([2, -1])


def test_cli_bench_mtl_smoke(tmp_path):
    """`gradops bench --suite mtl` runs end to end on a small model and writes its CSV."""
    csv_path = tmp_path / "mtl.csv"
    out = subprocess.run([sys.executable, "-m", "gradops", "bench", "--suite", "mtl", "--quick",
                          "--T", "2", "--methods", "ew,pcgrad", "--rounds", "2", "--budget", "1",
                          "--csv", str(csv_path)],
                         capture_output=True, text=True, env=dict(os.environ), check=True).stdout
    assert "| 2 | pcgrad |" in out and "PCGrad" in out
    assert "| 2 | per-task gradients by one batched (vmap) backward |" in out
    lines = csv_path.read_text().strip().splitlines()
    assert len(lines) >= 1 + 2 and "pcgrad" in csv_path.read_text()


def test_cli_bench_mtl_breakdown(tmp_path):
    """`--breakdown --breakdown-at` splits the step at each T asked for (as shipped and, where the
    Linear engine took layers, on the J path), prints the Gram + combine table and writes the
    stages' CSV; a T outside --T is refused."""
    csv_path = tmp_path / "mtl.csv"
    base = [sys.executable, "-m", "gradops", "bench", "--suite", "mtl", "--quick", "--T", "2,3",
            "--methods", "pcgrad", "--rounds", "2", "--budget", "1", "--breakdown"]
    out = subprocess.run([*base, "--breakdown-at", "2,3", "--csv", str(csv_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "gradops step breakdown, T = 2, 3" in out
    assert "| method | T | Gram, x floor step | combine | Gram + combine | whole step |" in out
    for T in (2, 3):
        line = next(x for x in out.splitlines() if x.startswith(f"| pcgrad | {T} | "))
        cells = [float(c.strip().rstrip("x")) for c in line.strip("|").split("|")[2:]]
        assert all(c > 0 for c in cells) and abs(cells[2] - cells[0] - cells[1]) < 2e-3
    import csv
    stages = list(csv.DictReader((tmp_path / "mtl_breakdown.csv").open()))
    assert {r["T"] for r in stages} == {"2", "3"}
    assert {r["method"] for r in stages} >= {"floor", "pcgrad"}
    bad = subprocess.run([*base, "--breakdown-at", "5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--breakdown-at 5 must be among --T 2,3" in bad.stderr


def test_breakdown_stages_name_what_mtl_optimizer_calls():
    """Every function and method the step breakdown times exists where it is looked up (the
    breakdown skips a missing name, which would drop its stage without a word)."""
    import importlib
    from gradops.bench import mtl_breakdown as bd
    from gradops.optim import MTLOptimizer
    for modname, attr, _ in bd._MODULE_STAGES:
        assert hasattr(importlib.import_module(modname), attr), (modname, attr)
    opt = MTLOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    for path, _ in bd._METHOD_STAGES:
        obj = opt
        for name in path.split("."):
            assert hasattr(obj, name), path
            obj = getattr(obj, name)


def test_benchmark_contenders_compute_the_same_step():
    """The mtl suite's floor, batched floor and gradops EW steps move the parameters alike."""
    from gradops.bench import mtl as bm
    s = bm.make_setup(3, width=32, depth=2, batch=8)
    results = []
    for make in (bm.floor_step, bm.batched_floor_step, lambda s: bm.gradops_step(s, "ew")):
        torch.manual_seed(0)
        step = make(s)
        step()
        results.append(torch.cat([p.detach().reshape(-1) for p in step.model.parameters()]))
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[2], results[0])
    assert not torch.equal(results[0], torch.cat([p.detach().reshape(-1)
                                                  for p in s.model.parameters()]))


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
