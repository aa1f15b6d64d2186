"""GPU tests: the Triton and CUDA C++ kernels on a real device (skipped without one).

Run on a machine with a GPU: ``pytest -m gpu``. Without one these are reported as skipped.
"""
from __future__ import annotations

import pytest
import torch

import gradops
from gradops.reference import sign_counts_reference

from backend_lists import gpu_backends
from helpers import DTYPES, assert_gram_close, make_J, random_offsets

pytestmark = pytest.mark.gpu

SHAPES = [(1, 1), (2, 7), (3, 257), (5, 1031), (8, 1 << 20), (13, 99_991), (40, 300_007),
          (64, 65_537), (64, 1), (100, 5000)]


@pytest.fixture(params=gpu_backends())
def gpu_backend(request):
    with gradops.use_backend(request.param):
        yield request.param


def _skip_unsupported(backend, T):
    if backend in ("triton", "cuda") and T > 64:
        pytest.skip(f"{backend} kernel supports T <= 64 (auto dispatch falls back)")


@pytest.mark.parametrize("T,P", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_gram_gpu(gpu_backend, T, P, dtype):
    _skip_unsupported(gpu_backend, T)
    J = make_J(T, P, dtype, seed=P).cuda()
    G = gradops.gram(J)
    assert G.device == J.device and G.dtype == torch.float32
    # 3xTF32 (Triton, fp32 input) is close to, not exactly, fp32 accuracy
    assert_gram_close(G.cpu(), J.cpu(), rel=1e-4)


@pytest.mark.parametrize("layout", ["row_view", "every_other_row", "col_strided", "transposed"])
def test_layouts_gpu(gpu_backend, layout):
    J = make_J(6, 10_001, layout=layout, seed=1)
    offsets = random_offsets(10_001, 9, seed=2)
    Gl = gradops.segment_gram(J.cuda(), offsets)
    assert_gram_close(Gl.cpu(), J, offsets, rel=1e-4)


@pytest.mark.parametrize("T,P,L", [(3, 1000, 7), (8, 2_000_003, 100), (40, 500_000, 300),
                                   (64, 70_000, 5), (4, 100_000, 5000)])
def test_segment_gram_and_counts_gpu(gpu_backend, T, P, L):
    _skip_unsupported(gpu_backend, T)
    J = make_J(T, P, seed=L, zero_frac=0.3)
    offsets = random_offsets(P, L, seed=L)
    for offs in (offsets, offsets.cuda()):
        res = gradops.segment_gram(J.cuda(), offs, return_sign_counts=True)
        assert_gram_close(res.gram.cpu(), J, offsets, rel=1e-4)
        opp, both = sign_counts_reference(J, offsets)
        assert torch.equal(res.opposite.cpu(), opp) and torch.equal(res.both_nonzero.cpu(), both)


def test_deterministic_gpu(gpu_backend):
    J = make_J(16, 3_000_001, seed=5).cuda()
    offsets = random_offsets(J.shape[1], 50, seed=1)
    first = gradops.segment_gram(J, offsets)
    for _ in range(5):
        assert torch.equal(gradops.segment_gram(J, offsets), first)


def test_nonfinite_gpu(gpu_backend):
    J = make_J(4, 5000, seed=0)
    J[2, 17] = float("nan")
    G = gradops.gram(J.cuda()).cpu()
    assert torch.isnan(G[2]).all() and torch.isfinite(G[:2, :2]).all()


def test_default_dispatch_on_cuda():
    r = gradops.info()["ops"]["gram"]["cuda"]
    assert r["default"] == "triton"


def test_metrics_no_host_sync():
    J = make_J(8, 100_000, seed=3).cuda()
    offsets = random_offsets(100_000, 20, seed=3)
    Gl = gradops.segment_gram(J, offsets)  # warm-up (offsets copied once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        G = Gl.sum(0)
        gradops.metrics.conflict_incidence(G)
        gradops.metrics.conflict_counts(Gl, -0.1)
        gradops.metrics.gms(Gl)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("T", [1, 2, 3, 8, 13, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighting_solvers_triton_gpu(T, dtype):
    """MGDA / CAGrad / Nash-MTL on CUDA run in one Triton program each (the default there) and
    agree with the C++ CPU solvers; no host synchronisation."""
    from gradops import weighting as W
    J = torch.randn(T, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(T))
    G = (J @ J.T).to(dtype)
    assert W._solver_backend(G.cuda()) == "triton"
    for name in ("mgda", "cagrad", "nashmtl"):
        fn = W.get(name)
        w_cpu, st_cpu = fn(G, return_status=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            w_gpu, st_gpu = fn(G.cuda(), return_status=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert bool(st_gpu.converged) and bool(st_cpu.converged), (name, st_gpu)
        d = (w_gpu.cpu().double() - w_cpu.double()) @ J
        # both within their solver tolerance of the same update
        assert float(d.norm()) <= 1e-2 * float((w_cpu.double() @ J).norm()) + 1e-6, name
