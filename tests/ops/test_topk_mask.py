"""Per-neuron top-K magnitude masks: every backend equals the stable-sort reference bit for bit."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradops
from gradops import _backend
from gradops.reference import topk_mask_reference

from backend_lists import cpu_backends

# the module (gradops.ops.topk_mask, the attribute, is the function)
topk_module = importlib.import_module("gradops.ops.topk_mask")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
# conftest's CPU backends that topk_mask implements: the C++ kernel ("cpp", unless the build was
# skipped with GRADOPS_NO_EXT=1), the torch path, and Triton when interpreted
TOPK_BACKENDS = [b for b in cpu_backends() if b in _backend._OPS["topk_mask"][0]]


@pytest.fixture(params=TOPK_BACKENDS)
def backend(request):
    with gradops.use_backend(request.param):
        yield request.param


def _rand(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    F = 1
    for d in t.shape[1:]:
        F *= d
    return t.reshape(t.shape[0], F)


def _mask_from_indices(idx: torch.Tensor, out: int, F: int) -> torch.Tensor:
    return torch.zeros(out, F, dtype=torch.bool).scatter_(1, idx.long(), True)


def check_against_reference(W: torch.Tensor, k: int) -> torch.Tensor:
    """topk_mask == reference (exactly), topk_indices == the reference's kept columns in
    increasing order (int32, [out, min(k, F)]); returns the mask."""
    ref = topk_mask_reference(W, k)
    mask = gradops.topk_mask(W, k)
    assert mask.dtype == torch.bool and mask.shape == W.shape
    assert torch.equal(mask, ref), f"{(mask != ref).sum().item()} entries differ"
    out, F = _rows(W).shape
    K = min(k, F)
    idx = gradops.topk_indices(W, k)
    assert idx.dtype == torch.int32 and idx.shape == (out, K) and idx.is_contiguous()
    if K > 1:
        assert bool((idx[:, 1:] > idx[:, :-1]).all()), "indices not strictly increasing"
    if out * K:
        assert int(idx.min()) >= 0 and int(idx.max()) < F
    assert torch.equal(_mask_from_indices(idx, out, F), _rows(ref))
    return mask


# --- against the reference on the shapes that occur in practice --------------------------------
LINEAR = [(3, 1), (5, 7), (4, 33), (6, 768), (3, 3072)]


@pytest.mark.parametrize("out,F", LINEAR, ids=[f"{o}x{f}" for o, f in LINEAR])
def test_linear_matches_reference(backend, out, F):
    W = _rand((out, F), seed=F)
    for k in sorted({0, 1, 2, F // 2, F - 1, F, F + 5, 300}):
        if k >= 0:
            check_against_reference(W, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dtypes(backend, dtype):
    for shape, k in [((6, 768), 300), ((8, 4, 3, 3), 10), ((5, 129), 64)]:
        W = _rand(shape, dtype, seed=shape[-1])
        m = check_against_reference(W, k)
        assert _rows(m).sum(1).eq(min(k, _rows(W).shape[1])).all()


def test_conv_and_1d(backend):
    W = _rand((16, 3, 3, 3), seed=1)                   # F = 27
    for k in (0, 1, 9, 26, 27, 300):
        check_against_reference(W, k)
    W = _rand((8, 5, 1, 1), seed=2)                    # 1x1 conv, F = 5
    check_against_reference(W, 3)
    W = _rand((7, 2, 4, 4), seed=3)[:, :, 1:3, ::2]    # non-contiguous conv view
    check_against_reference(W, 5)
    v = _rand((9,), seed=4)                            # 1-D: [out, 1]
    for k in (0, 1, 5):
        m = check_against_reference(v, k)
        assert bool(m.all()) == (k >= 1)


def test_rows_shorter_than_k_and_empty(backend):
    W = _rand((4, 10), seed=5)
    assert bool(gradops.topk_mask(W, 11).all()) and bool(gradops.topk_mask(W, 10).all())
    assert not bool(gradops.topk_mask(W, 0).any())
    assert torch.equal(gradops.topk_indices(W, 1000),
                       torch.arange(10, dtype=torch.int32).expand(4, 10))
    assert gradops.topk_indices(W, 0).shape == (4, 0)
    for shape in [(0, 5), (0,), (3, 0), (0, 3, 3, 3), (2, 0, 3)]:
        W = torch.empty(shape)
        m = gradops.topk_mask(W, 3)
        assert m.shape == shape and m.dtype == torch.bool
        out, F = _rows(W).shape
        assert gradops.topk_indices(W, 3).shape == (out, min(3, F))


# --- ties, NaN, layouts -----------------------------------------------------------------------
def test_ties_go_to_lower_index(backend):
    g = torch.Generator().manual_seed(6)
    ints = torch.randint(-3, 4, (12, 257), generator=g).float()    # many equal magnitudes
    for k in (1, 5, 100, 200, 256):
        check_against_reference(ints, k)
    same = torch.full((4, 50), 2.5)
    same[1] = -2.5
    same[2, ::2] = -2.5                                              # +-x: equal magnitudes
    same[3] = 0.0
    for k in (1, 17, 49):
        m = check_against_reference(same, k)
        expected = torch.zeros(4, 50, dtype=torch.bool)
        expected[:, :k] = True                                       # the first k columns
        assert torch.equal(m, expected)
    row = torch.tensor([[1.0, -3.0, 2.0, 3.0, -2.0, 3.0]])
    assert torch.equal(gradops.topk_indices(row, 3), torch.tensor([[1, 3, 5]], dtype=torch.int32))
    assert torch.equal(gradops.topk_indices(row, 4), torch.tensor([[1, 2, 3, 5]],
                                                                  dtype=torch.int32))


def test_fp64_magnitudes_compared_in_fp64(backend):
    """fp64 weights are ranked by their fp64 magnitudes: 1 + 1e-12 beats 1 (the same in fp32),
    1e300 ties only with -1e300 (both +inf in fp32), as in the reference."""
    W = torch.tensor([[1.0, 1.0 + 1e-12, 0.5], [1.0, 1.0 + 1e-6, 0.5],
                      [1.0 + 2.3e-16, -(1.0 + 4.5e-16), 1.0]], dtype=torch.float64)
    assert torch.equal(gradops.topk_indices(W, 1), torch.tensor([[1], [1], [1]],
                                                                dtype=torch.int32))
    check_against_reference(W, 1)
    check_against_reference(W, 2)
    big = torch.tensor([[1e300, 1e301, -1e300, float("inf")]], dtype=torch.float64)
    assert torch.equal(gradops.topk_indices(big, 2), torch.tensor([[1, 3]], dtype=torch.int32))
    wide = _rand((7, 300), torch.float64, seed=31) * (1 + torch.rand(7, 300,
                                                                    dtype=torch.float64) * 1e-9)
    for k in (1, 13, 150):
        check_against_reference(wide, k)


def test_subnormals_signed_zeros_and_infinities(backend):
    tiny = torch.tensor([1e-45, 3e-42, 1e-39, 1.2e-38, 0.0, -0.0])   # fp32 subnormals and zeros
    W = torch.stack([tiny, -tiny.flip(0), torch.tensor([-0.0, 0.0, -0.0, 0.0, 1e-45, 0.0])])
    for k in range(7):
        check_against_reference(W, k)
    inf = torch.tensor([[1.0, float("inf"), -float("inf"), 3e38, -3.4e38, 2.0]])
    for k in range(7):
        check_against_reference(inf, k)
    assert torch.equal(gradops.topk_indices(inf, 2), torch.tensor([[1, 2]], dtype=torch.int32))
    check_against_reference(torch.tensor([[1e300, -1e300, 1.0]], dtype=torch.float64), 1)
    fmax = torch.finfo(torch.float32).max                  # +inf stays above the largest float
    big = torch.tensor([[1.0, -fmax, float("inf"), fmax], [fmax, 2.0, -float("inf"), 0.0]])
    assert torch.equal(gradops.topk_indices(big, 1), torch.tensor([[2], [2]], dtype=torch.int32))
    check_against_reference(big, 2)


def test_nan_counts_as_largest(backend):
    W = _rand((5, 40), seed=7)
    W[0, 3] = float("nan")
    W[1, [5, 30]] = float("nan")
    W[2, 10] = -float("nan")
    W[3, 2], W[3, 7] = float("inf"), float("nan")    # NaN ranks above +inf; NaNs tie
    W[3, 12] = float("nan")
    W[4] = float("nan")                                # an all-NaN row
    for k in (1, 2, 3, 20):
        check_against_reference(W, k)
    m = gradops.topk_mask(W, 1)
    assert bool(m[0, 3]) and bool(m[1, 5]) and bool(m[2, 10]) and bool(m[3, 7]) and bool(m[4, 0])
    m2 = gradops.topk_mask(W, 2)
    assert bool(m2[3, 7]) and bool(m2[3, 12]) and not bool(m2[3, 2])
    m3 = gradops.topk_mask(W, 3)
    assert bool(m3[3, 2]) and bool(m3[3, 7]) and bool(m3[3, 12])
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        check_against_reference(W.to(dtype), 2)
        assert torch.equal(gradops.topk_indices(W.to(dtype)[3:4], 2),
                           torch.tensor([[7, 12]], dtype=torch.int32))
    # [inf, nan], k = 1 keeps the NaN, as the docs say (and torch.sort)
    for dtype in DTYPES:
        row = torch.tensor([[float("inf"), float("nan")]], dtype=dtype)
        assert torch.equal(gradops.topk_indices(row, 1), torch.tensor([[1]], dtype=torch.int32))


def test_non_contiguous(backend):
    X = _rand((300, 6), seed=8)
    check_against_reference(X.T, 100)                  # transposed view: column stride 6
    big = _rand((10, 400), seed=9)
    check_against_reference(big[::2, 3:303], 77)       # row view, unaligned start
    check_against_reference(big[:, ::3], 40)           # strided columns
    conv = _rand((6, 4, 3, 3), seed=10).to(memory_format=torch.channels_last)
    check_against_reference(conv, 11)
    check_against_reference(_rand((8, 1), seed=11).expand(8, 50), 7)   # stride 0: all ties


def test_parameter_input(backend):
    lin = torch.nn.Linear(20, 6)
    m = gradops.topk_mask(lin.weight, 5)
    assert not m.requires_grad and torch.equal(m, topk_mask_reference(lin.weight.detach(), 5))
    assert gradops.topk_indices(lin.bias, 1).shape == (6, 1)


def test_wide_rows_take_the_torch_path(backend, monkeypatch):
    """Rows wider than the Triton block use the torch path (the fallback for very wide rows);
    the C++ kernel takes any width."""
    calls = []
    real = topk_module._topk_torch

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(topk_module, "_topk_torch", counting)
    monkeypatch.setitem(topk_module._IMPLS, "torch", counting)
    monkeypatch.setattr(topk_module, "MAX_TRITON_F", 64)
    W = _rand((5, 100), seed=12)
    W[:, ::7] = 1.0
    check_against_reference(W, 30)
    # mask and indices: both on the torch path (Triton: the wide-row fallback), none for C++
    assert len(calls) == (0 if backend == "cpp" else 2)
    calls.clear()
    check_against_reference(_rand((5, 64), seed=13), 30)
    assert len(calls) == (2 if backend == "torch" else 0)


def test_default_backend_on_cpu():
    """The C++ kernel serves CPU tensors when the extension is built, else the torch path."""
    for op in ("topk_mask", "topk_indices"):
        cpu = gradops.info()["ops"][op]["cpu"]
        assert cpu["default"] == ("cpp" if _backend.ext_available() else "torch")
        assert "cpp" in _backend._OPS[op][0]


def test_larger_weights_ties_and_nan(backend):
    """Weights large enough for the C++ kernel's threads, rows of ViT-B widths and wider, the
    threshold in a crowded histogram bin (tie-heavy integers, values within one bin), NaN."""
    g = torch.Generator().manual_seed(60)
    cases = [((64, 3072), 300), ((300, 768), 300), ((40, 3, 16, 16), 300), ((3, 20_000), 4321),
             ((512, 9), 4)]
    for dtype in DTYPES:
        for shape, k in cases:
            for kind in ("normal", "ints", "one_bin"):
                if kind == "normal":
                    W = torch.randn(shape, generator=g)
                elif kind == "ints":
                    W = torch.randint(-3, 4, shape, generator=g).float()
                else:                                   # all in [1, 1 + 2^-4): one 1/8-octave bin
                    W = 1 + torch.rand(shape, generator=g) / 16
                W = W.to(dtype)
                W.view(-1)[::997] = float("nan")
                check_against_reference(W, k)


# --- properties -------------------------------------------------------------------------------
PROPS = settings(max_examples=30, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def weights(draw):
    out = draw(st.integers(1, 6))
    F = draw(st.integers(1, 80))
    kind = draw(st.sampled_from(["normal", "ints", "few_values"]))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        W = torch.randn(out, F, generator=g)
    elif kind == "ints":
        W = torch.randint(-4, 5, (out, F), generator=g).float()
    else:
        W = torch.tensor([-1.5, 0.0, 1.5, 0.25])[torch.randint(0, 4, (out, F), generator=g)]
    dtype = draw(st.sampled_from(DTYPES))
    return W.to(dtype)


@PROPS
@given(backend=st.sampled_from(TOPK_BACKENDS), W=weights(), k=st.integers(0, 100))
def test_properties(backend, W, k):
    with gradops.use_backend(backend):
        m = gradops.topk_mask(W, k)
        idx = gradops.topk_indices(W, k)
    out, F = W.shape
    K = min(k, F)
    assert bool((m.sum(1) == K).all())                  # exactly min(k, F) per row
    mag = W.abs().float()
    for r in range(out):
        kept, dropped = mag[r][m[r]], mag[r][~m[r]]
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()          # every kept >= every dropped
            thr = kept.min()
            # among equal magnitudes at the threshold, the kept ones have the lower indices
            tie_cols = torch.nonzero(mag[r] == thr).flatten()
            kept_ties = m[r][tie_cols]
            assert bool((kept_ties[:-1].int() >= kept_ties[1:].int()).all())
    assert idx.dtype == torch.int32 and idx.shape == (out, K)
    assert torch.equal(_mask_from_indices(idx, out, F), m)
    assert torch.equal(m, topk_mask_reference(W, k))


@PROPS
@given(backend=st.sampled_from(TOPK_BACKENDS), W=weights(), k=st.integers(1, 100),
       perm_seed=st.integers(0, 999))
def test_mask_depends_only_on_magnitude(backend, W, k, perm_seed):
    """Flipping signs leaves the mask unchanged; scaling by a power of two too."""
    signs = torch.randint(0, 2, W.shape, generator=torch.Generator().manual_seed(perm_seed))
    flipped = torch.where(signs.bool(), -W, W)
    with gradops.use_backend(backend):
        m = gradops.topk_mask(W, k)
        assert torch.equal(gradops.topk_mask(flipped, k), m)
        if W.dtype in (torch.float32, torch.float64):
            assert torch.equal(gradops.topk_mask(W * 4.0, k), m)


# --- torch.library integration ----------------------------------------------------------------
def _samples():
    yield _rand((5, 7), seed=20), 3
    yield _rand((4, 3, 3, 3), torch.bfloat16, seed=21), 10
    yield _rand((6,), torch.float16, seed=22), 1
    yield _rand((3, 40), seed=23), 0
    yield _rand((3, 40), torch.float64, seed=24), 100
    yield torch.randint(-2, 3, (4, 30), generator=torch.Generator().manual_seed(25)).float(), 9


def test_opcheck(backend):
    for W, k in _samples():
        torch.library.opcheck(torch.ops.gradops.topk_mask.default, (W, k))
        torch.library.opcheck(torch.ops.gradops.topk_indices.default, (W, k))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def masks(W1, W2, k: int):
        m1 = gradops.topk_mask(W1, k)
        idx = gradops.topk_indices(W2, k)
        kept = W2.reshape(W2.shape[0], -1).gather(1, idx.long())
        return m1, m1.sum(), idx, kept.abs().sum()

    W1 = _rand((6, 50), seed=30)
    W2 = _rand((8, 2, 3, 3), seed=31)
    m1, n, idx, s = masks(W1, W2, 7)
    assert torch.equal(m1, topk_mask_reference(W1, 7)) and int(n) == 42
    ref2 = _rows(topk_mask_reference(W2, 7))
    assert torch.equal(_mask_from_indices(idx, 8, 18), ref2)
    torch.testing.assert_close(s, _rows(W2).abs()[ref2].sum())


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["topk_mask", "topk_indices"])
def test_errors_name_the_argument(fn):
    op = getattr(gradops, fn)
    W = torch.randn(4, 5)
    with pytest.raises(ValueError, match=rf"gradops.{fn}: k must be >= 0, got -1"):
        op(W, -1)
    for bad in (2.0, 2.5, True, "3", None, torch.tensor(3)):
        with pytest.raises(TypeError, match=rf"gradops.{fn}: k must be an int"):
            op(W, bad)
    with pytest.raises(TypeError, match=rf"gradops.{fn}: W must be floating point.*torch.int64"):
        op(torch.ones(4, 5, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match=r"W must be floating point.*torch.bool"):
        op(torch.ones(4, 5, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match=rf"gradops.{fn}: W must have at least one dimension"):
        op(torch.tensor(1.0), 1)
    with pytest.raises(TypeError, match=r"W must be a torch.Tensor, got list"):
        op([[1.0, 2.0]], 1)
    import numpy as np
    assert op(W, np.int64(2)).shape[0] == 4            # integer scalars of other libraries: fine


def test_benchmark_peers_agree_with_reference():
    """The contenders of ``gradops bench --suite topk`` compute the same masks (no ties here)."""
    from gradops.bench import models, peers, topk
    assert len(models.VIT_B16_SHAPES) == 49
    assert sum(torch.Size(s).numel() for s in models.VIT_B16_SHAPES) == 85_524_480
    ws = [_rand((6, 40), seed=40), _rand((5, 3, 4, 4), seed=41), _rand((4, 10), seed=42)]
    for fn in (topk.topk_mask_all, peers.torch_topk_masks, peers.argsort_masks,
               peers.numpy_row_loop_masks):
        for m, w in zip(fn(ws, 12), ws):
            assert torch.equal(torch.as_tensor(m), topk_mask_reference(w, 12)), fn.__name__


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_backend", ["triton", "torch"])
def test_gpu_matches_reference(gpu_backend):
    """Triton kernel (and the torch path) on a CUDA device, ViT-B shapes, a 16,384-wide row (the
    widest one block takes), a wider one (the fallback) and narrow rows packed several per
    program; random and tie-heavy (integer) weights."""
    cases = [((2304, 768), 300), ((768, 3072), 300), ((768, 3, 16, 16), 300), ((32, 16384), 5000),
             ((4, 20_000), 300), ((100, 9), 4), ((33,), 1), ((7, 100), 100)]
    g = torch.Generator().manual_seed(50)
    for dtype in DTYPES:
        for shape, k in cases:
            for ties in (False, True):
                W = (torch.randint(-3, 4, shape, generator=g).float() if ties else
                     torch.randn(shape, generator=g)).to(dtype)
                W.view(-1)[::997] = float("nan")
                with gradops.use_backend(gpu_backend):
                    m = gradops.topk_mask(W.cuda(), k)
                    idx = gradops.topk_indices(W.cuda(), k)
                ref = topk_mask_reference(W, k)
                assert torch.equal(m.cpu(), ref), (dtype, shape, k, ties)
                out, F = _rows(W).shape
                assert idx.dtype == torch.int32 and idx.shape == (out, min(k, F))
                assert torch.equal(_mask_from_indices(idx.cpu(), out, F), _rows(ref))
