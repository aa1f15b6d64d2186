"""float64 inputs: every op accepts them, computes in float64 (the torch path, on every device) and
returns float64 where it returns floating results; a forced kernel backend refuses them clearly.

Ground truths are plain float64 expressions written here (``J @ J.T``, ``w @ J``, the vector form
of PCGrad, GradDrop's formula), compared with a relative tolerance of 1e-12: float32
accumulation would miss it by ~1e-7.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradops
from gradops import metrics, weighting
from gradops.optim import MTLOptimizer
from gradops.reference import (linear_combine_reference, linear_gram_reference, pcgrad_reference,
                               philox_uniform_reference, topk_mask_reference)
from gradops.segments import offsets_from_numels

from helpers import with_layout

F64 = torch.float64
REL = 1e-12
TINY = 1e-300
SHAPES = [(T, P) for T in (1, 2, 3, 7) for P in (1, 33, 1000)]
LAYOUTS = ("contiguous", "row_view", "every_other_row", "col_strided", "transposed")
KERNEL_BACKENDS = ["cpp"] + (["triton"] if gradops._backend.triton_interpret() else [])


def j64(T: int, P: int, layout: str = "contiguous", seed: int = 0) -> torch.Tensor:
    """A ``[T, P]`` float64 matrix with full 53-bit mantissas, in the given memory layout."""
    g = torch.Generator().manual_seed(seed)
    return with_layout(torch.randn(T, P, generator=g, dtype=F64), layout)


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """``|got - ref| <= REL * bound`` elementwise (``bound``: sum of absolute terms), in float64."""
    assert got.dtype == F64, got.dtype
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = (got - ref).abs()
    tol = REL * bound + TINY
    assert bool((err <= tol).all()), f"max error / tolerance = {(err / tol).max().item():.3g}"


def seg_list(offsets: torch.Tensor) -> list[tuple[int, int]]:
    o = offsets.tolist()
    return list(zip(o[:-1], o[1:]))


def offsets_for(P: int) -> torch.Tensor:
    """Four segments over ``P`` columns with two empty ones (first and third)."""
    return torch.tensor([0, 0, P // 2, P // 2, P], dtype=torch.int64)


# --- gram / segment_gram ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("T,P", SHAPES)
def test_gram(T, P, layout):
    J = j64(T, P, layout, seed=T * 1000 + P)
    X = J.contiguous()
    G = gradops.gram(J)
    assert_close_rel(G, X @ X.T, X.abs() @ X.abs().T)


@pytest.mark.parametrize("layout", ("contiguous", "row_view", "col_strided"))
@pytest.mark.parametrize("T,P", SHAPES)
def test_segment_gram_and_sign_counts(T, P, layout):
    J = j64(T, P, layout, seed=T + P)
    J[:, ::5] = 0.0                              # zeros take no part in the sign counts
    X = J.contiguous()
    offsets = offsets_for(P)
    Gl = gradops.segment_gram(J, offsets)
    ref = torch.stack([X[:, a:b] @ X[:, a:b].T for a, b in seg_list(offsets)])
    bound = torch.stack([X[:, a:b].abs() @ X[:, a:b].abs().T for a, b in seg_list(offsets)])
    assert_close_rel(Gl, ref, bound)
    assert torch.equal(Gl[0], torch.zeros(T, T, dtype=F64))   # empty segments: zero Grams
    res = gradops.segment_gram(J, offsets, return_sign_counts=True)
    assert_close_rel(res.gram, ref, bound)
    pos, neg = (X > 0).long(), (X < 0).long()
    for l, (a, b) in enumerate(seg_list(offsets)):
        p, n = pos[:, a:b], neg[:, a:b]
        assert torch.equal(res.opposite[l], p @ n.T + n @ p.T)
        assert torch.equal(res.both_nonzero[l], (p + n) @ (p + n).T)
    whole = gradops.gram(J, return_sign_counts=True)
    assert_close_rel(whole.gram, X @ X.T, X.abs() @ X.abs().T)
    assert whole.opposite.dtype == torch.int64
    assert torch.equal(whole.opposite, pos @ neg.T + neg @ pos.T)


def test_gram_autograd_float64():
    J = j64(3, 40, seed=1).requires_grad_()
    Gbar = torch.randn(3, 3, dtype=F64)
    (gradops.gram(J) * Gbar).sum().backward()
    assert J.grad.dtype == F64
    ref = (Gbar + Gbar.T) @ J.detach()
    assert_close_rel(J.grad, ref, (Gbar.abs() + Gbar.abs().T) @ J.detach().abs())
    J.grad = None
    offsets = torch.tensor([0, 10, 10, 40])
    W = torch.randn(3, 3, 3, dtype=F64)
    (gradops.segment_gram(J, offsets) * W).sum().backward()
    ref = torch.cat([(W[l] + W[l].T) @ J.detach()[:, a:b] for l, (a, b)
                     in enumerate(seg_list(offsets))], 1)
    assert_close_rel(J.grad, ref, ref.abs() + J.detach().abs().sum() * W.abs().sum())


def test_dispatcher_and_eager_paths_agree():
    """The eager fast path (plain CPU call) and the custom op give the same float64 results."""
    J = j64(3, 100, seed=2)
    offsets = torch.tensor([0, 30, 100])
    assert torch.equal(gradops.gram(J), torch.ops.gradops.gram(J))
    assert torch.equal(gradops.segment_gram(J, offsets), torch.ops.gradops.segment_gram(J, offsets))
    w = torch.randn(3, dtype=F64)
    assert torch.equal(gradops.combine(J, w), torch.ops.gradops.combine(J, w, None))


def test_float64_takes_the_torch_backend():
    cpu = torch.device("cpu")
    for op in ("gram", "segment_gram", "combine", "pcgrad_weights", "graddrop"):
        assert gradops._backend.select_backend(op, cpu, 3, F64) == "torch"
        assert gradops.info()["ops"][op]["cpu"]["default_float64"] == "torch"
    # float32 keeps its kernels
    assert gradops._backend.select_backend("gram", cpu, 3, torch.float32) == \
        gradops.info()["ops"]["gram"]["cpu"]["default"]


# --- combine ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ("contiguous", "row_view", "transposed"))
@pytest.mark.parametrize("T,P", SHAPES)
def test_combine(T, P, layout):
    J = j64(T, P, layout, seed=3 * T + P)
    X = J.contiguous()
    g = torch.Generator().manual_seed(T)
    w = torch.randn(T, generator=g, dtype=F64)
    bound = w.abs() @ X.abs()
    assert_close_rel(gradops.combine(J, w), w @ X, bound)
    assert_close_rel(gradops.combine(J, w.float()), w.float().double() @ X,
                     w.float().double().abs() @ X.abs())          # float32 weights: exact in fp64
    out = torch.full((P,), float("nan"), dtype=F64)
    assert gradops.combine(J, w, out=out) is out
    assert_close_rel(out, w @ X, bound)
    big = torch.zeros(2 * P, dtype=F64)                             # a strided destination
    gradops.combine(J, w, out=big[::2])
    assert_close_rel(big[::2], w @ X, bound)
    assert torch.equal(big[1::2], torch.zeros(P, dtype=F64))      # nothing else touched
    # per-segment weights, with empty segments
    offsets = offsets_for(P)
    W = torch.randn(4, T, generator=g, dtype=F64)
    ref = torch.cat([W[l] @ X[:, a:b] for l, (a, b) in enumerate(seg_list(offsets))])
    bnd = torch.cat([W[l].abs() @ X[:, a:b].abs() for l, (a, b) in enumerate(seg_list(offsets))])
    assert_close_rel(gradops.combine(J, W, offsets), ref, bnd)
    out = torch.empty(P, dtype=F64)
    gradops.combine(J, W, offsets, out=out)
    assert_close_rel(out, ref, bnd)


def test_combine_mixed_precision_out():
    """float32 J into a float64 ``out`` (float32 math, then widened), float64 J into float32."""
    J = j64(3, 200, seed=4)
    w = torch.randn(3, dtype=F64)
    out64 = torch.empty(200, dtype=F64)
    gradops.combine(J.float(), w.float(), out=out64)
    torch.testing.assert_close(out64, (w.float() @ J.float()).double(), rtol=1e-5, atol=1e-5)
    out32 = torch.empty(200, dtype=torch.float32)
    gradops.combine(J, w, out=out32)
    assert torch.equal(out32, (w @ J).float())


# --- pcgrad / pcgrad_weights --------------------------------------------------------------------
def _pcgrad_bound(X: torch.Tensor) -> float:
    """Scale of PCGrad's rounding: every projection adds terms of size up to ``sum |g|``."""
    return (X.abs().sum(0).max().item() * X.shape[0] ** 2) + TINY


@pytest.mark.parametrize("layout", ("contiguous", "row_view"))
@pytest.mark.parametrize("T,P", SHAPES)
def test_pcgrad(T, P, layout):
    J = j64(T, P, layout, seed=5 * T + P)
    X = J.contiguous()
    perms = gradops.random_orders(T, generator=torch.Generator().manual_seed(P))
    for reduction in ("sum", "mean"):
        g, w = gradops.pcgrad(J, perms=perms, reduction=reduction, return_weights=True)
        assert g.dtype == F64 and w.dtype == F64
        ref = pcgrad_reference(X, perms, reduction)
        assert_close_rel(g, ref, torch.full_like(ref, _pcgrad_bound(X)))
        wG = gradops.pcgrad_weights(X @ X.T, perms=perms, reduction=reduction)
        assert wG.dtype == F64
        assert_close_rel(wG @ X, ref, torch.full_like(ref, _pcgrad_bound(X)))
    # per-layer PCGrad, with empty segments
    offsets = offsets_for(P)
    perms_l = gradops.random_orders(T, (4,), generator=torch.Generator().manual_seed(T))
    g, w = gradops.pcgrad(J, perms=perms_l, offsets=offsets, return_weights=True)
    assert w.shape == (4, T) and w.dtype == F64
    ref = torch.cat([pcgrad_reference(X[:, a:b], perms_l[l]) for l, (a, b)
                     in enumerate(seg_list(offsets))])
    assert_close_rel(g, ref, torch.full_like(ref, _pcgrad_bound(X)))
    out = torch.empty(P, dtype=F64)
    assert gradops.pcgrad(J, perms=perms, out=out) is out


def test_pcgrad_weights_batched_and_generator():
    J = j64(5, 300, seed=6)
    G = J @ J.T
    w1 = gradops.pcgrad_weights(G, generator=torch.Generator().manual_seed(3))
    w2 = weighting.pcgrad(G, generator=torch.Generator().manual_seed(3))
    assert w1.dtype == F64 and w2.dtype == F64 and torch.equal(w1, w2)
    Gb = torch.stack([G, 2 * G])
    perms = gradops.random_orders(5, (2,), generator=torch.Generator().manual_seed(1))
    wb = gradops.pcgrad_weights(Gb, perms=perms)
    assert wb.dtype == F64 and wb.shape == (2, 5)
    torch.testing.assert_close(wb[1], gradops.pcgrad_weights(2 * G, perms=perms[1]), rtol=0,
                               atol=0)


# --- graddrop -----------------------------------------------------------------------------------
def graddrop64(X: torch.Tensor, leak: torch.Tensor, U: torch.Tensor, eps: float = 1e-7):
    """GradDrop (Chen et al., NeurIPS 2020, Eq. 1-3) in float64: ``(g, M, bound)``."""
    S, A = X.sum(0), X.abs().sum(0)
    p = 0.5 * (1 + S / (A + eps))
    M = ((p > U) & (X > 0)) | ((p < U) & (X < 0))
    lk = leak.to(F64)[:, None]
    return ((lk + (1 - lk) * M.to(F64)) * X).sum(0), M, A


@pytest.mark.parametrize("layout", ("contiguous", "row_view", "col_strided"))
@pytest.mark.parametrize("T,P", SHAPES)
def test_graddrop(T, P, layout):
    J = j64(T, P, layout, seed=7 * T + P)
    X = J.contiguous()
    U = torch.rand(P, generator=torch.Generator().manual_seed(T), dtype=F64)
    leaks = [0.0, 0.3, [0.1 * (t % 4) for t in range(T)], torch.full((T,), 0.7, dtype=F64),
             torch.full((T,), 0.25)]
    for leak in leaks:
        lt = torch.as_tensor(leak, dtype=F64).reshape(-1).expand(T)
        ref, M, A = graddrop64(X, lt, U)
        g, mask = gradops.graddrop(J, leak=leak, noise=U, return_mask=True)
        assert g.dtype == F64 and mask.dtype == torch.bool
        assert torch.equal(mask, M)
        assert_close_rel(g, ref, A)
    assert_close_rel(gradops.graddrop(J, leak=1.0, noise=U), X.sum(0), X.abs().sum(0))


def test_graddrop_generator_matches_its_noise():
    """A generator's draw: the seed's Philox numbers (float32, as on every backend) as noise."""
    J = j64(3, 257, seed=8)
    g = gradops.graddrop(J, generator=torch.Generator().manual_seed(11))
    seed = torch.randint(0, 2**63 - 1, (1,), generator=torch.Generator().manual_seed(11))
    U = philox_uniform_reference(int(seed), torch.arange(257)).double()
    ref, _, A = graddrop64(J, torch.zeros(3), U)
    assert_close_rel(g, ref, A)


# --- topk_mask / topk_indices, psn_masks ----------------------------------------------------------
def topk64(W: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row top-k of float64 magnitudes, ties to the lower index (a stable sort)."""
    rows = W.reshape(W.shape[0], -1)
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros(rows.shape, dtype=torch.bool).scatter_(1, order, True).reshape(W.shape)


@pytest.mark.parametrize("shape,k", [((7, 33), 5), ((4, 3, 3, 3), 10), ((16,), 1),
                                     ((3, 1000), 999)])
def test_topk(cpu_backend, shape, k):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(k), dtype=F64)
    mag32 = W.reshape(W.shape[0], -1).abs().float()
    assert all(torch.unique(r).numel() == r.numel() for r in mag32)   # no ties after rounding
    mask = gradops.topk_mask(W, k)
    assert mask.dtype == torch.bool and torch.equal(mask, topk64(W, k))
    assert torch.equal(mask, topk_mask_reference(W, k))
    idx = gradops.topk_indices(W.transpose(0, -1).contiguous().transpose(0, -1), k)
    rows = W.reshape(W.shape[0], -1)
    K = min(k, rows.shape[1])
    assert idx.dtype == torch.int32 and idx.shape == (W.shape[0], K)
    packed = torch.zeros(rows.shape, dtype=torch.bool).scatter_(1, idx.long(), True)
    assert torch.equal(packed, mask.reshape(rows.shape))


def test_psn_masks_float64_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    masks = gradops.sparse.psn_masks(model, k=3)
    for name in ("0.weight", "2.weight"):
        W = dict(model.named_parameters())[name]
        assert torch.equal(masks[name], topk64(W.detach(), 3))
    for method in ("random", "global", "reverse"):
        m = gradops.sparse.psn_masks(model, k=3, method=method,
                                     generator=torch.Generator().manual_seed(0))
        assert m["0.weight"].dtype == torch.bool and int(m["0.weight"].sum()) + \
            int(m["2.weight"].sum()) == 3 * 8 + 3 * 4
    rev = gradops.sparse.psn_masks(model, k=3, method="reverse")
    assert torch.equal(rev["0.weight"], topk64(-1 / model[0].weight.detach(), 3))


# --- linear_gram / linear_combine ----------------------------------------------------------------
@pytest.mark.parametrize("N,n_in", [(4, 12), (16, 5)])
@pytest.mark.parametrize("form", ("eigh", "kernel"))
def test_linear_gram_and_combine(N, n_in, form):
    g = torch.Generator().manual_seed(N)
    X = torch.randn(N, n_in, generator=g, dtype=F64)
    D = torch.randn(3, N, 6, generator=g, dtype=F64)
    for bias in (False, True):
        G = gradops.linear_gram(X, D, bias, form=form)
        ref = linear_gram_reference(X, D, bias)
        assert_close_rel(G, ref, torch.full_like(ref, 100 * ref.abs().max().item()))
    w = torch.randn(3, generator=g, dtype=F64)
    C = gradops.linear_combine(X, D, w)
    ref = linear_combine_reference(X, D, w)
    assert_close_rel(C, ref, torch.full_like(ref, 10 * ref.abs().max().item()))
    out = torch.empty(6, n_in, dtype=F64)
    assert gradops.linear_combine(X, D, w, out=out) is out


# --- metrics and weightings ----------------------------------------------------------------------
def test_metrics_float64():
    J = j64(4, 100, seed=9)
    J[3] = 0.0                                           # a zero gradient: cosine 0, GMS 0
    G = J @ J.T
    n = J.norm(dim=1)
    assert_close_rel(metrics.norms(G), n, n)
    cos = metrics.cosine(G)
    ref = torch.where((n[:, None] * n[None]) == 0, 0.0, G / (n[:, None] * n[None]))
    assert_close_rel(cos, ref, torch.ones_like(ref))
    gms = metrics.gms(G)
    den = n[:, None] ** 2 + n[None] ** 2
    ref = torch.where(den == 0, 0.0, 2 * n[:, None] * n[None] / den)
    assert_close_rel(gms, ref, torch.ones_like(ref))
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    n_conf = sum(int(G[i, j] < 0) for i, j in pairs)
    assert int(metrics.conflict_counts(G)) == n_conf
    assert int(metrics.conflict_counts(G, -0.05)) == sum(int(ref_c < -0.05) for ref_c in
                                                          [cos[i, j] for i, j in pairs])
    inc = metrics.conflict_incidence(G)
    assert inc.dtype == F64 and inc.item() == n_conf / 6
    Gl = gradops.segment_gram(J, torch.tensor([0, 50, 100]))
    assert metrics.cosine(Gl).dtype == F64 and metrics.conflict_counts(Gl).shape == (2,)
    counts = gradops.gram(J, return_sign_counts=True)
    ratio = metrics.sign_conflict_ratio(counts.opposite, counts.both_nonzero)
    both = counts.both_nonzero.double()
    torch.testing.assert_close(ratio.double(), torch.where(both == 0, 0.0, counts.opposite / both))


@pytest.mark.parametrize("name", sorted(weighting.METHODS))
def test_weightings_float64(name):
    J = j64(4, 60, seed=10)
    w = weighting.get(name)(J @ J.T)
    assert w.dtype == F64 and w.shape == (4,) and bool(torch.isfinite(w).all())


def gradvac_vector64(J: torch.Tensor, perms: torch.Tensor, beta: float, eps: float):
    """GradVac (Wang et al., ICLR 2021, Alg. 1; Eq. 8-9) on one layer's gradients, vector by
    vector in float64, targets starting at 0: ``(sum_i g_i', targets)``."""
    T = J.shape[0]
    tgt = torch.zeros(T, T, dtype=F64)
    out = torch.zeros_like(J[0])
    for i in range(T):
        g = J[i].clone()
        for j in perms[i].tolist():
            if j == i:
                continue
            ni, nj = g.norm(), J[j].norm()
            phi = torch.dot(g, J[j]) / (ni * nj + eps)
            phi_t = tgt[i, j]
            root_t, root = (1 - phi_t ** 2).clamp_min(0).sqrt(), (1 - phi ** 2).clamp_min(0).sqrt()
            if phi < phi_t:
                g = g + J[j] * ni * (phi_t * root - phi * root_t) / (nj * root_t + eps)
            tgt[i, j] = (1 - beta) * phi_t + beta * phi
        out += g
    return out, tgt


def test_gradvac_weights_float64():
    J = j64(4, 200, seed=11)
    perms = gradops.random_orders(4, generator=torch.Generator().manual_seed(2))
    w, tgt = weighting.gradvac_weights((J @ J.T)[None], torch.zeros(1, 4, 4, dtype=F64), perms,
                                       0.5, 1e-8)
    ref, ref_tgt = gradvac_vector64(J, perms, 0.5, 1e-8)
    assert w.dtype == F64 and tgt.dtype == F64
    assert_close_rel(w[0] @ J, ref, torch.full_like(ref, _pcgrad_bound(J)))
    assert_close_rel(tgt[0], ref_tgt, torch.ones_like(ref_tgt))


# --- non-finite values ----------------------------------------------------------------------------
def test_non_finite_propagate():
    J = j64(3, 33, seed=12)
    J[1, 5] = float("nan")
    J[2, 9] = float("inf")
    G = gradops.gram(J)
    assert G.dtype == F64
    assert bool(G[1].isnan().all()) and bool(G[:, 1].isnan().all())
    assert G[2, 2].item() == float("inf") and bool(torch.isfinite(G[0, 0]))
    Gl = gradops.segment_gram(J, torch.tensor([0, 4, 8, 33]))
    assert bool(torch.isfinite(Gl[0]).all()) and bool(Gl[1, 1].isnan().all())
    assert Gl[2, 2, 2].item() == float("inf")
    out = gradops.combine(J, torch.tensor([1.0, 0.0, 1.0], dtype=F64))   # 0 * NaN is NaN
    assert out[5].isnan() and out[9].item() == float("inf")
    assert bool(torch.isfinite(out[[i for i in range(33) if i not in (5, 9)]]).all())
    assert not bool(torch.isfinite(gradops.pcgrad(J)).all())
    assert not bool(torch.isfinite(gradops.pcgrad_weights(G)).all())
    g = gradops.graddrop(J, noise=torch.full((33,), 0.5, dtype=F64))
    assert g[5].isnan() and not bool(torch.isfinite(g[9]))
    assert bool(torch.isfinite(g[[i for i in range(33) if i not in (5, 9)]]).all())
    assert bool(metrics.cosine(G)[1].isnan().all())


# --- torch.compile ------------------------------------------------------------------------------
def test_torch_compile_fullgraph_float64():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="eager")
    def step(J, w, offsets, out):
        G = gradops.gram(J)
        Gl = gradops.segment_gram(J, offsets)
        g = gradops.combine(J, w)
        gradops.combine(J, w.expand(3, -1).contiguous(), offsets, out=out)
        return G, Gl, g

    J = j64(4, 300, seed=13)
    w = torch.randn(4, dtype=F64)
    offsets = torch.tensor([0, 100, 100, 300])
    out = torch.empty(300, dtype=F64)
    G, Gl, g = step(J, w, offsets, out)
    assert G.dtype == Gl.dtype == g.dtype == F64
    assert torch.equal(G, gradops.gram(J)) and torch.equal(Gl, gradops.segment_gram(J, offsets))
    assert torch.equal(g, gradops.combine(J, w)) and torch.equal(out, g)


# --- forced kernel backends refuse float64 --------------------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forced_kernel_backend_refuses_float64(backend):
    J = j64(3, 20, seed=14)
    w = torch.ones(3, dtype=F64)
    calls = {
        "gram": lambda: gradops.gram(J),
        "gram_sign_counts": lambda: gradops.gram(J, return_sign_counts=True),
        "segment_gram": lambda: gradops.segment_gram(J, torch.tensor([0, 20])),
        "combine": lambda: gradops.combine(J, w),
        "combine_out64": lambda: gradops.combine(J.float(), w.float(),
                                                  out=torch.empty(20, dtype=F64)),
        "pcgrad": lambda: gradops.pcgrad(J),
        "pcgrad_weights": lambda: gradops.pcgrad_weights(J @ J.T),
        "graddrop": lambda: gradops.graddrop(J),
    }
    with gradops.use_backend(backend):
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match=rf"forced backend '{backend}' cannot run this "
                                                   rf"call: .*got torch\.float64"):
                call()
        assert gradops.topk_mask(J, 2).shape == J.shape      # its kernels take float64
    with gradops.use_backend("torch"):
        assert_close_rel(gradops.gram(J), J @ J.T, J.abs() @ J.abs().T)


# --- other dtypes are still refused, naming the argument and the dtype ----------------------------
@pytest.mark.parametrize("dtype", (torch.int64, torch.complex128))
def test_other_dtypes_refused(dtype):
    J = torch.ones(3, 8, dtype=dtype)
    msg = rf"J must be float32, bfloat16, float16 or float64, got {dtype}"
    for call in (lambda: gradops.gram(J), lambda: gradops.segment_gram(J, torch.tensor([0, 8])),
                 lambda: gradops.combine(J, torch.ones(3)), lambda: gradops.pcgrad(J),
                 lambda: gradops.graddrop(J)):
        with pytest.raises(TypeError, match=msg):
            call()
    with pytest.raises(TypeError, match=rf"out must be float32, bfloat16, float16 or float64, "
                                        rf"got {dtype}"):
        gradops.combine(j64(3, 8), torch.ones(3, dtype=F64), out=torch.zeros(8, dtype=dtype))
    with pytest.raises(TypeError, match=rf"G must be floating point, got {dtype}"):
        gradops.pcgrad_weights(torch.ones(3, 3, dtype=dtype),
                               perms=gradops.random_orders(3))


# --- MTLOptimizer on a float64 model --------------------------------------------------------------
MTL_CASES = [(m, mode) for mode in ("off", "on") for m in ("pcgrad", "mgda", "cagrad", "graddrop",
                                                           "gradvac")]
def _mtl_problem(T: int = 3):
    torch.manual_seed(0)
    # batch N = 4 < fan-in: the Linear engine takes the factored path with linear_gram="on"
    enc = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).double()
    heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(T)]).double()
    x = torch.randn(4, 12, dtype=F64)
    y = torch.randn(T, 4, 1, dtype=F64)
    return enc, heads, x, y


def _losses(enc, heads, x, y):
    z = enc(x)
    return [((h(z) - y[t]) ** 2).mean() for t, h in enumerate(heads)]


def _reference_grad(method, enc, heads, x, y, gen, state, G_opt):
    """The method through the ops on the float64 Jacobian of a copy of the model."""
    shared = list(enc.parameters())
    losses = _losses(enc, heads, x, y)
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, shared,
                                                                           retain_graph=True)])
                     for l in losses])
    offsets = offsets_from_numels([p.numel() for p in shared])
    G = gradops.gram(J)
    T = J.shape[0]
    if method == "graddrop":
        return J, G, gradops.graddrop(J, generator=gen)
    if method == "gradvac":
        perms = gradops.random_orders(T, generator=gen)
        Gl = gradops.segment_gram(J, offsets)
        tgt = state.get("targets", torch.zeros_like(Gl))
        w, state["targets"] = weighting.gradvac_weights(Gl, tgt, perms, 0.5, 1e-8)
        return J, G, gradops.combine(J, w, offsets)
    if method == "pcgrad":
        w = weighting.pcgrad(G, generator=gen)
    else:
        # iterative solvers stop at a tolerance: a last-bit change of G (the Linear engine's
        # Gram) moves w by up to that tolerance, so they are run on the optimizer's Gram, which
        # is checked against G separately
        w = weighting.get(method)(G_opt)
    return J, G, gradops.combine(J, w)


def _run_mtl(method: str, mode: str, steps: int = 4):
    """Train ``steps`` SGD steps; per step, the optimizer's and the reference's shared gradients
    (and Grams: inf when not float64). Returns ``(errors, gram_errors, first_loss, last_loss)``."""
    enc, heads, x, y = _mtl_problem()
    ref_enc, ref_heads = copy.deepcopy(enc), copy.deepcopy(heads)   # no optimizer hooks on them
    inner = torch.optim.SGD(list(enc.parameters()) + list(heads.parameters()), lr=0.05)
    opt = MTLOptimizer(inner, method=method, shared=enc, linear_gram=mode,
                       generator=torch.Generator().manual_seed(7))
    gen, state = torch.Generator().manual_seed(7), {}
    errors, gram_errors, totals = [], [], []
    for _ in range(steps):
        opt.zero_grad()
        losses = _losses(enc, heads, x, y)
        totals.append(sum(l.item() for l in losses))
        info = opt.backward(losses)
        got = torch.cat([p.grad.reshape(-1) for p in enc.parameters()])
        assert got.dtype == F64 and all(p.grad.dtype == F64 for p in heads.parameters())
        ref_enc.load_state_dict(enc.state_dict())
        ref_heads.load_state_dict(heads.state_dict())
        J, G, ref = _reference_grad(method, ref_enc, ref_heads, x, y, gen, state, info.gram)
        if info.gram is not None:
            gram_errors.append(((info.gram.double() - G).abs() / (J.abs() @ J.abs().T)).max()
                               .item() if info.gram.dtype == F64 else float("inf"))
        errors.append(((got - ref).abs().max() / ref.abs().max()).item())
        opt.step()
    if mode == "on" and method != "graddrop":
        assert opt.stats()["factored_layers"] > 0, "the Linear engine did not run"
    return errors, gram_errors, totals[0], sum(l.item() for l in _losses(enc, heads, x, y))


@pytest.mark.parametrize("method,mode", MTL_CASES)
def test_mtl_optimizer_float64(method, mode):
    """A float64 model trains with every method, with float64 gradients equal to the method run
    through the ops on the float64 Jacobian to float64 rounding (nothing on the way is rounded
    to float32; the step's Gram is float64 too), with and without the Linear engine."""
    errors, gram_errors, first, last = _run_mtl(method, mode)
    assert max(errors) < REL, errors
    assert not gram_errors or max(gram_errors) < REL, gram_errors
    assert last < first


@pytest.mark.gpu
def test_float64_on_cuda_takes_the_torch_path():
    """On a GPU float64 takes the torch path too (the kernels do not take it): CPU results."""
    dev = torch.device("cuda")
    J = j64(5, 3000, seed=15)
    offsets = torch.tensor([0, 1000, 1000, 3000])
    w = torch.randn(5, dtype=F64)
    perms = gradops.random_orders(5, generator=torch.Generator().manual_seed(0))
    U = torch.rand(3000, dtype=F64)
    Jd = J.to(dev)
    for op in ("gram", "segment_gram", "combine", "pcgrad_weights", "graddrop"):
        assert gradops._backend.select_backend(op, dev, 5, F64) == "torch"
    got = [gradops.gram(Jd), gradops.segment_gram(Jd, offsets), gradops.combine(Jd, w.to(dev)),
           gradops.pcgrad(Jd, perms=perms.to(dev)), gradops.graddrop(Jd, noise=U.to(dev))]
    ref = [gradops.gram(J), gradops.segment_gram(J, offsets), gradops.combine(J, w),
           gradops.pcgrad(J, perms=perms), gradops.graddrop(J, noise=U)]
    for a, b in zip(got, ref):
        assert a.device.type == "cuda" and a.dtype == F64
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-12)
    with gradops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="forced backend 'triton' cannot run this call"):
            gradops.gram(Jd)
