"""gradops.linear_gram / linear_combine: the Gram and the weighted sum of a Linear layer's per-task
weight gradients from its input X and output gradients D, against the gradients formed
explicitly (gradops.reference), on many shapes, dtypes and degenerate inputs; properties
(permutation, scaling, the Gram form equals the vector form); errors; non-finite propagation."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradops
from gradops.reference import linear_combine_reference, linear_gram_reference


def _data(T, N, n_in, n_out, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n_in, generator=g).to(dtype)
    D = torch.randn(T, N, n_out, generator=g).to(dtype)
    return X, D


def _close(G, ref, rtol):
    # entries relative to the Gram's scale (off-diagonal entries may be small against it)
    scale = ref.abs().max().clamp_min(1e-30)
    assert G.shape == ref.shape
    assert ((G.double() - ref).abs().max() / scale).item() < rtol


# N < in: the eigendecomposition path; N >= in: the gradients are formed
SHAPES = [(1, 1, 1, 1), (1, 4, 9, 3), (2, 3, 17, 5), (3, 7, 64, 33), (5, 16, 100, 7),
          (7, 33, 64, 64), (13, 8, 129, 31), (40, 64, 256, 96), (64, 5, 40, 3),
          (3, 20, 8, 6), (2, 9, 9, 4)]


@pytest.mark.parametrize("T,N,n_in,n_out", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("form", ["auto", "eigh", "kernel"])
def test_gram_matches_explicit_gradients(T, N, n_in, n_out, bias, form):
    X, D = _data(T, N, n_in, n_out)
    G = gradops.linear_gram(X, D, bias=bias, form=form)
    assert G.dtype == torch.float32
    _close(G, linear_gram_reference(X, D, bias), 2e-5)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-5),
                                        (torch.float16, 2e-5)])
def test_gram_dtypes_accumulate_in_fp32_or_fp64(dtype, rtol):
    X, D = _data(5, 12, 48, 20, dtype)
    G = gradops.linear_gram(X, D, bias=True)
    assert G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _close(G, linear_gram_reference(X, D, True), rtol)     # the reference sees the same inputs


@pytest.mark.parametrize("form", ["eigh", "kernel"])
def test_gram_singular_inputs_zero_rows_and_rank_deficiency(form):
    X, D = _data(6, 16, 64, 10)
    X[3:9] = 0.0                                   # dead rows (ReLU): K is singular
    X[10] = X[11] * 2.0                            # rank-deficient
    D[2] = 0.0                                     # a task with no gradient
    D[4] = D[1] * -3.0                             # two colinear tasks
    G = gradops.linear_gram(X, D, bias=True, form=form)
    ref = linear_gram_reference(X, D, True)
    _close(G, ref, 2e-5)
    assert torch.equal(G[2], torch.zeros(6)) and torch.equal(G[:, 2], torch.zeros(6))
    assert (torch.linalg.eigvalsh(G.double()) > -1e-4 * ref.abs().max()).all()  # PSD


def test_gram_of_empty_rows_is_zero():
    X, D = _data(3, 0, 8, 4)
    assert torch.equal(gradops.linear_gram(X, D, bias=True), torch.zeros(3, 3))


@pytest.mark.parametrize("form", ["eigh", "kernel"])
def test_gram_non_finite_propagates(form):
    X, D = _data(4, 6, 32, 5)
    D1 = D.clone()
    D1[1, 2, 3] = float("nan")
    G = gradops.linear_gram(X, D1, form=form)
    assert torch.isnan(G[1]).all() and torch.isnan(G[:, 1]).all()
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = mask[:, 1] = False
    assert torch.isfinite(G[mask]).all()
    D2 = D.clone()
    D2[0, 0, 0] = float("inf")
    assert not torch.isfinite(gradops.linear_gram(X, D2, form=form)[0]).any()
    X3 = X.clone()
    X3[2, 5] = float("inf")
    assert torch.isnan(gradops.linear_gram(X3, D, form=form)).all()
    X4 = X.clone()
    X4[0, 0] = float("nan")
    assert torch.isnan(gradops.linear_gram(X4, D, form=form)).all()


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 9), N=st.integers(1, 12), n_in=st.integers(1, 24),
       n_out=st.integers(1, 9), seed=st.integers(0, 2**16), scale=st.floats(0.01, 100.0))
def test_gram_properties(T, N, n_in, n_out, seed, scale):
    X, D = _data(T, N, n_in, n_out, seed=seed)
    G = gradops.linear_gram(X, D, bias=True)
    # the Gram form equals the vector form: the Gram of the explicit gradient vectors
    rows = torch.cat([torch.matmul(D.transpose(1, 2), X).reshape(T, -1), D.sum(1)], 1)
    _close(G, rows.double() @ rows.double().T, 5e-5)
    # permuting the tasks permutes the Gram
    p = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    _close(gradops.linear_gram(X, D[p], bias=True), G.double()[p][:, p], 5e-5)
    # D -> sD scales the Gram by s^2; X -> sX too
    _close(gradops.linear_gram(X, D * scale, bias=False),
           gradops.linear_gram(X, D).double() * scale ** 2, 5e-5)
    _close(gradops.linear_gram(X * scale, D), gradops.linear_gram(X, D).double() * scale ** 2,
           5e-5)
    # symmetric
    assert torch.allclose(G, G.T, rtol=1e-5, atol=1e-6 * G.abs().max().item())


@pytest.mark.parametrize("T,N,n_in,n_out", SHAPES)
def test_combine_matches_explicit_gradients(T, N, n_in, n_out):
    X, D = _data(T, N, n_in, n_out)
    w = torch.randn(T, generator=torch.Generator().manual_seed(3))
    ref = linear_combine_reference(X, D, w)
    got = gradops.linear_combine(X, D, w)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    out = torch.full((n_out, n_in), float("nan"))
    assert gradops.linear_combine(X, D, w, out=out) is out
    torch.testing.assert_close(out, got)


def test_combine_equals_combine_of_explicit_rows_and_propagates_non_finite():
    X, D = _data(5, 8, 30, 6)
    w = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5])
    J = torch.matmul(D.transpose(1, 2), X).reshape(5, -1)
    torch.testing.assert_close(gradops.linear_combine(X, D, w).reshape(-1),
                               gradops.combine(J, w), rtol=1e-5, atol=1e-5)
    D[3, 1, 2] = float("inf")                      # weight 0 * inf: NaN, as in combine
    assert torch.isnan(gradops.linear_combine(X, D, w)[2]).all()


def test_errors_name_the_argument():
    X, D = _data(3, 4, 5, 6)
    with pytest.raises(ValueError, match="X must be 2-D"):
        gradops.linear_gram(X[None], D)
    with pytest.raises(ValueError, match=r"D must be 3-D \[T, N, out\]"):
        gradops.linear_gram(X, D[0])
    with pytest.raises(ValueError, match="must match X's rows"):
        gradops.linear_gram(X[:3], D)
    with pytest.raises(TypeError, match="one dtype"):
        gradops.linear_gram(X.double(), D)
    with pytest.raises(TypeError, match="X must be a floating tensor"):
        gradops.linear_gram(X.long(), D)
    with pytest.raises(TypeError, match="D must be a torch.Tensor"):
        gradops.linear_gram(X, D.tolist())
    with pytest.raises(ValueError, match="form must be"):
        gradops.linear_gram(X, D, form="chol")
    with pytest.raises(ValueError, match="at least one task"):
        gradops.linear_gram(X, D[:0])
    with pytest.raises(ValueError, match=r"weights must be \[T\] = \[3\]"):
        gradops.linear_combine(X, D, torch.ones(4))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        gradops.linear_combine(X, D, torch.ones(3), out=torch.empty(5, 6))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        gradops.linear_combine(X, D, torch.ones(3), out=torch.empty(5, 6).T)


@pytest.mark.gpu
def test_gram_and_combine_on_gpu():
    X, D = _data(7, 16, 64, 24)
    w = torch.randn(7)
    Xc, Dc = X.cuda(), D.cuda()
    for form in ("auto", "eigh", "kernel"):
        _close(gradops.linear_gram(Xc, Dc, bias=True, form=form).cpu(),
               linear_gram_reference(X, D, True), 2e-5)
    torch.testing.assert_close(gradops.linear_combine(Xc, Dc, w.cuda()).cpu().double(),
                               linear_combine_reference(X, D, w), rtol=1e-4, atol=1e-3)
