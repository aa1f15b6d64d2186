"""combine: w^T J and per-segment combinations against the reference; out= writes in place."""
from __future__ import annotations

import pytest
import torch

import gradops

from helpers import DTYPES, make_J, random_offsets

SHAPES = [(1, 1), (2, 7), (3, 257), (5, 1031), (8, 4099), (13, 300), (40, 777), (64, 129),
          (100, 65)]


def _check_close(g, J, w, offsets=None, rel=2e-6):
    Jd = J.double()
    if w.dim() == 1:
        ref, bound = w.double() @ Jd, w.double().abs() @ Jd.abs()
    else:
        o = offsets.tolist()
        ref = torch.cat([w[l].double() @ Jd[:, a:b] for l, (a, b) in enumerate(zip(o[:-1], o[1:]))])
        bound = torch.cat([w[l].double().abs() @ Jd[:, a:b].abs()
                           for l, (a, b) in enumerate(zip(o[:-1], o[1:]))])
    out_eps = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[g.dtype]
    tol = rel * bound + out_eps * ref.abs() + 1e-30
    assert g.shape == (J.shape[1],)
    assert bool(((g.double() - ref).abs() <= tol).all()), ((g.double() - ref).abs() / tol).max()


@pytest.mark.parametrize("T,P", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_combine_matches_reference(cpu_backend, T, P, dtype):
    J = make_J(T, P, dtype, seed=P)
    w = torch.randn(T, generator=torch.Generator().manual_seed(T))
    g = gradops.combine(J, w)
    assert g.dtype == dtype
    _check_close(g, J, w)


@pytest.mark.parametrize("layout", ["row_view", "every_other_row", "col_strided", "transposed"])
def test_combine_layouts(cpu_backend, layout):
    J = make_J(6, 1001, layout=layout, seed=2)
    w = torch.randn(6)
    _check_close(gradops.combine(J, w), J, w)


@pytest.mark.parametrize("T,P,L", [(1, 1, 1), (3, 100, 7), (8, 4099, 60), (13, 500, 3), (4, 5, 9)])
def test_combine_per_segment(cpu_backend, T, P, L):
    J = make_J(T, P, seed=L)
    offsets = random_offsets(P, L, seed=P)
    w = torch.randn(L, T)
    g = gradops.combine(J, w, offsets)
    _check_close(g, J, w, offsets)
    # same as the per-segment loop
    o = offsets.tolist()
    for l, (a, b) in enumerate(zip(o[:-1], o[1:])):
        if b > a:
            _check_close(g[a:b], J[:, a:b], w[l])


@pytest.mark.parametrize("out_dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_out_writes_into_grad_views_only(cpu_backend, out_dtype):
    """The combined gradient lands in .grad views of one flat buffer; nothing else changes."""
    params = [torch.nn.Parameter(torch.zeros(s, dtype=out_dtype))
              for s in ((3, 4), (5,), (2, 2, 2))]
    sizes = [p.numel() for p in params]
    flat = torch.full((sum(sizes) + 10,), 7.0, dtype=out_dtype)   # sentinel tail
    views = flat[5:5 + sum(sizes)]
    for p, v in zip(params, views.split(sizes)):
        p.grad = v.view_as(p)
    J = make_J(4, sum(sizes), seed=1)
    w = torch.tensor([1.0, -0.5, 2.0, 0.25])
    ret = gradops.combine(J, w, out=views)
    assert ret.data_ptr() == views.data_ptr()
    assert torch.equal(flat[:5], torch.full((5,), 7.0, dtype=out_dtype))
    assert torch.equal(flat[-5:], torch.full((5,), 7.0, dtype=out_dtype))
    _check_close(torch.cat([p.grad.flatten() for p in params]), J, w)


def test_out_strided_destination(cpu_backend):
    J = make_J(3, 50, seed=0)
    w = torch.randn(3)
    big = torch.zeros(100)
    gradops.combine(J, w, out=big[::2])
    _check_close(big[::2].clone(), J, w)
    assert torch.equal(big[1::2], torch.zeros(50))


def test_nonfinite_propagates_even_with_zero_weight(cpu_backend):
    J = make_J(3, 40, seed=0)
    J[1, 5] = float("nan")
    J[2, 7] = float("inf")
    g = gradops.combine(J, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.isnan(g[5]) and torch.isnan(g[7])  # 0 * inf = nan
    assert torch.isfinite(g[:5]).all()


def test_combine_deterministic(cpu_backend):
    J = make_J(9, 30_001 if cpu_backend != "triton" else 3001, seed=3)
    w = torch.randn(9)
    assert torch.equal(gradops.combine(J, w), gradops.combine(J, w))


@pytest.mark.parametrize("bad,match", [
    (dict(weights=torch.randn(4)), r"weights must be \[T\] or \[L, T\] with T = 3"),
    (dict(weights=torch.randn(2, 3)), r"need offsets"),
    (dict(weights=torch.randn(2, 3), offsets=torch.tensor([0, 10])), r"L = 2 rows but offsets"),
    (dict(weights=torch.randn(3), offsets=torch.tensor([0, 10])),
     r"offsets given but weights is \[T\]"),
    (dict(weights=torch.randn(3), out=torch.zeros(9)), r"out must be a 1-D tensor of P = 10"),
    (dict(weights=torch.randn(3), out=torch.zeros(10, dtype=torch.int32)), r"out must be float32"),
    (dict(weights=torch.ones(3, dtype=torch.long)), r"weights must be floating point"),
    (dict(weights=torch.randn(3, 3), offsets=torch.tensor([0, 6, 4, 10])), r"non-decreasing"),
])
def test_combine_errors(bad, match):
    J = torch.randn(3, 10)
    w = bad.pop("weights")
    with pytest.raises((ValueError, TypeError), match=match):
        gradops.combine(J, w, **bad)
