"""gram / segment_gram (+ sign counts): every CPU-runnable backend against a float64 reference."""
from __future__ import annotations

import pytest
import torch

import gradops
from gradops.reference import sign_counts_reference

from helpers import DTYPES, assert_gram_close, make_J, random_offsets

# (T, P): T = 1, 2, 3, primes, 40, 64; P = 1, odd, not a multiple of any block, larger
SHAPES = [(1, 1), (1, 1000), (2, 1), (2, 7), (3, 257), (5, 1031), (7, 4099), (13, 300),
          (16, 513), (31, 64), (40, 777), (64, 129), (64, 2000)]
LARGE_SHAPES = [(8, 65537), (3, 300001), (40, 20011), (100, 3001)]  # T = 100 > kernel tile limits
LAYOUTS = ["contiguous", "row_view", "every_other_row", "col_strided", "transposed"]


def _skip_slow_for_triton(backend: str, T: int, P: int) -> None:
    # the Triton interpreter runs kernels through numpy: keep its shapes small
    if backend == "triton" and (T * P > 150_000 or T > 64):
        pytest.skip("shape too large for the Triton interpreter (covered by the GPU tests)")


@pytest.mark.parametrize("T,P", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_gram_matches_reference(cpu_backend, T, P, dtype):
    J = make_J(T, P, dtype, seed=T * 1000 + P)
    G = gradops.gram(J)
    assert G.shape == (T, T) and G.dtype == torch.float32 and G.device == J.device
    assert_gram_close(G, J)


@pytest.mark.parametrize("T,P", LARGE_SHAPES)
def test_gram_large(cpu_backend, T, P):
    _skip_slow_for_triton(cpu_backend, T, P)
    J = make_J(T, P, seed=P)
    assert_gram_close(gradops.gram(J), J)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_layouts(cpu_backend, layout, dtype):
    J = make_J(6, 1001, dtype, layout=layout, seed=3)
    assert_gram_close(gradops.gram(J), J)
    offsets = torch.tensor([0, 0, 1, 500, 1001])
    assert_gram_close(gradops.segment_gram(J, offsets), J, offsets)


@pytest.mark.parametrize("T,P,L", [(1, 1, 1), (2, 10, 3), (3, 257, 7), (7, 1000, 50),
                                   (13, 4099, 200), (40, 600, 9), (64, 300, 4), (5, 5, 5),
                                   (4, 3, 10)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_segment_gram_matches_reference(cpu_backend, T, P, L, dtype):
    J = make_J(T, P, dtype, seed=L)
    offsets = random_offsets(P, L, seed=T + P + L)
    Gl = gradops.segment_gram(J, offsets)
    assert Gl.shape == (L, T, T) and Gl.dtype == torch.float32
    assert_gram_close(Gl, J, offsets)
    assert_gram_close(Gl.sum(0), J)


def test_segment_gram_empty_and_single_column_segments(cpu_backend):
    J = make_J(5, 20, seed=1)
    offsets = torch.tensor([0, 0, 0, 1, 2, 2, 19, 20, 20])
    Gl = gradops.segment_gram(J, offsets)
    for l in (0, 1, 4, 7):  # empty segments: exactly zero
        assert torch.equal(Gl[l], torch.zeros(5, 5))
    col = J[:, 0:1].double()
    assert torch.allclose(Gl[2].double(), col @ col.T, rtol=1e-6, atol=1e-7)
    assert_gram_close(Gl, J, offsets)


def test_segment_gram_many_segments(cpu_backend):
    P = 3000 if cpu_backend == "triton" else 40_000
    J = make_J(4, P, seed=2)
    offsets = random_offsets(P, P // 20, seed=5)
    assert_gram_close(gradops.segment_gram(J, offsets), J, offsets)


def test_zero_columns(cpu_backend):
    J = torch.empty(3, 0)
    assert torch.equal(gradops.gram(J), torch.zeros(3, 3))
    Gl, opp, both = gradops.segment_gram(J, torch.tensor([0, 0]), return_sign_counts=True)
    assert torch.equal(Gl, torch.zeros(1, 3, 3))
    assert torch.equal(opp, torch.zeros(1, 3, 3, dtype=torch.long))
    assert torch.equal(both, torch.zeros(1, 3, 3, dtype=torch.long))


@pytest.mark.parametrize("T,P", [(1, 5), (2, 7), (3, 1000), (7, 4099), (40, 300), (64, 65)])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_sign_counts(cpu_backend, T, P, dtype):
    J = make_J(T, P, dtype, seed=P, zero_frac=0.3)
    J[0, :2] = -0.0  # negative zero is zero
    res = gradops.gram(J, return_sign_counts=True)
    assert isinstance(res, gradops.GramWithSignCounts)
    assert_gram_close(res.gram, J)
    opp, both = sign_counts_reference(J)
    assert res.opposite.dtype == torch.int64
    assert torch.equal(res.opposite, opp)
    assert torch.equal(res.both_nonzero, both)
    # the diagonal of both_nonzero is the count of non-zeros of each row; no row conflicts itself
    assert torch.equal(res.both_nonzero.diagonal(), (J != 0).sum(1))
    assert torch.equal(res.opposite.diagonal(), torch.zeros(T, dtype=torch.long))


def test_segment_sign_counts(cpu_backend):
    J = make_J(6, 2001, seed=9, zero_frac=0.5)
    offsets = random_offsets(2001, 17, seed=4)
    res = gradops.segment_gram(J, offsets, return_sign_counts=True)
    opp, both = sign_counts_reference(J, offsets)
    assert torch.equal(res.opposite, opp) and torch.equal(res.both_nonzero, both)
    assert torch.equal(res.opposite.sum(0), gradops.gram(J, return_sign_counts=True).opposite)
    assert_gram_close(res.gram, J, offsets)


def test_nonfinite_propagates(cpu_backend):
    J = make_J(4, 300, seed=0)
    J[2, 17] = float("nan")
    J[3, 250] = float("inf")
    G = gradops.gram(J)
    assert torch.isnan(G[2]).all() and torch.isnan(G[:, 2]).all()
    assert not torch.isfinite(G[3]).any()
    assert torch.isfinite(G[:2, :2]).all()
    Gl = gradops.segment_gram(J, torch.tensor([0, 100, 200, 300]))
    assert torch.isnan(Gl[0, 2]).all() and torch.isfinite(Gl[1:, 2, :2]).all()
    assert not torch.isfinite(Gl[2, 3]).any() and torch.isfinite(Gl[:2, 3, :2]).all()
    # NaN is neither zero nor of a sign for the counts
    res = gradops.gram(J, return_sign_counts=True)
    assert res.both_nonzero[2, 2] == 299


def test_deterministic(cpu_backend):
    J = make_J(9, 20_001 if cpu_backend != "triton" else 2001, seed=11)
    offsets = random_offsets(J.shape[1], 13, seed=1)
    first = gradops.segment_gram(J, offsets)
    for _ in range(3):
        assert torch.equal(gradops.segment_gram(J, offsets), first)
    assert torch.equal(gradops.gram(J), gradops.gram(J))


def test_cpp_independent_of_thread_count():
    J = make_J(8, 300_007, seed=4)
    offsets = random_offsets(J.shape[1], 37, seed=2)
    prev = torch.get_num_threads()
    with gradops.use_backend("cpp"):
        try:
            torch.set_num_threads(1)
            one = gradops.segment_gram(J, offsets, return_sign_counts=True)
            g1 = gradops.gram(J)
            torch.set_num_threads(2)
            two = gradops.segment_gram(J, offsets, return_sign_counts=True)
            g2 = gradops.gram(J)
        finally:
            torch.set_num_threads(prev)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert torch.equal(g1, g2)


def test_int64_indexing_past_2_31():
    """P > 2^31 columns (bf16, 4 GiB): small segments straddling 2^31 and at the very end have
    exact fp32 sums, and the int64 counts are exact, so a wrapped 32-bit index would show."""
    P = (1 << 31) + 5
    try:
        J = torch.ones(1, P, dtype=torch.bfloat16)
    except RuntimeError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot allocate 4 GiB: {e}")
    J[0, -1] = 3.0
    J[0, (1 << 31) + 1] = -2.0
    offsets = torch.tensor([0, (1 << 31) - 3, (1 << 31) + 3, P - 1, P])
    with gradops.use_backend("cpp"):
        Gl = gradops.segment_gram(J, offsets, return_sign_counts=True)
        whole = gradops.gram(J, return_sign_counts=True)
    assert Gl.gram[1:, 0, 0].tolist() == [9.0, 1.0, 9.0]  # 5 ones and a -2; one 1; one 3
    assert Gl.both_nonzero[:, 0, 0].tolist() == [(1 << 31) - 3, 6, 1, 1]
    assert whole.both_nonzero.item() == P
    assert whole.gram.item() == pytest.approx(float(P - 2 + 4 + 9), rel=1e-6)


# The C++ kernel picks its instruction set at run time (AVX-512, AVX2 or portable);
# GRADOPS_CPU_ISA=avx2 / portable selects a lesser one, so every variant is checked on this host.
@pytest.mark.parametrize("isa", ["best", "avx2", "portable"])
def test_cpp_every_cpu_isa(monkeypatch, isa):
    if isa != "best":
        monkeypatch.setenv("GRADOPS_CPU_ISA", isa)
    with gradops.use_backend("cpp"):
        for T, P in [(1, 17), (2, 1000), (3, 1031), (5, 4099), (8, 2053), (13, 777), (16, 1024),
                     (23, 515), (40, 1537), (64, 300)]:
            for dtype in DTYPES:
                J = make_J(T, P, dtype, seed=T * 7 + P, zero_frac=0.2)
                res = gradops.gram(J, return_sign_counts=True)
                assert_gram_close(res.gram, J)
                opp, both = sign_counts_reference(J)
                assert torch.equal(res.opposite, opp) and torch.equal(res.both_nonzero, both)
        for layout in LAYOUTS:
            J = make_J(7, 2001, torch.bfloat16, layout=layout, seed=5)
            offsets = torch.tensor([0, 0, 1, 1000, 1500, 2001])
            assert_gram_close(gradops.segment_gram(J, offsets), J, offsets)
        J = make_J(11, 300_007, seed=3)
        offsets = random_offsets(J.shape[1], 29, seed=7)
        Gl = gradops.segment_gram(J, offsets)
        assert_gram_close(Gl, J, offsets)
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(gradops.segment_gram(J, offsets), Gl)
        finally:
            torch.set_num_threads(prev)
        J = make_J(6, 300, seed=0)
        J[2, 17] = float("nan")
        J[5, 250] = float("-inf")
        G = gradops.gram(J)
        assert torch.isnan(G[2]).all() and not torch.isfinite(G[5]).any()
        assert torch.isfinite(G[:2, :2]).all()
