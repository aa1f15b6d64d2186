"""Property tests in the style of TorchJD's: structural facts every Gram backend must satisfy."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradops

from backend_lists import cpu_backends
from helpers import make_J, random_offsets

CASES = settings(max_examples=25, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
backends = st.sampled_from(cpu_backends())
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _tol(J: torch.Tensor) -> torch.Tensor:
    A = J.abs().double()
    return 3e-5 * (A @ A.T) + 1e-30


@CASES
@given(backend=backends, T=st.integers(1, 12), P=st.integers(1, 700), seed=st.integers(0, 999),
       dtype=dtypes)
def test_symmetric_and_psd(backend, T, P, seed, dtype):
    J = make_J(T, P, dtype, seed=seed)
    with gradops.use_backend(backend):
        G = gradops.gram(J).double()
    assert torch.allclose(G, G.T, rtol=0, atol=0) or bool(((G - G.T).abs() <= _tol(J)).all())
    eig = torch.linalg.eigvalsh(G)
    assert eig.min() >= -1e-5 * max(G.diagonal().sum().item(), 1e-30)


@CASES
@given(backend=backends, T=st.integers(1, 12), P=st.integers(1, 500), seed=st.integers(0, 999))
def test_permuting_rows_permutes_G(backend, T, P, seed):
    J = make_J(T, P, seed=seed)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    with gradops.use_backend(backend):
        G = gradops.gram(J).double()
        Gp = gradops.gram(J[perm]).double()
    assert bool(((Gp - G[perm][:, perm]).abs() <= 2 * _tol(J[perm])).all())


@CASES
@given(backend=backends, T=st.integers(1, 10), P=st.integers(1, 500), seed=st.integers(0, 999),
       row=st.integers(0, 9), scale=st.sampled_from([0.0, -1.0, 0.5, 3.0, 1024.0, -1e-3]))
def test_scaling_a_row_scales_its_row_and_column(backend, T, P, seed, row, scale):
    row = row % T
    J = make_J(T, P, seed=seed)
    J2 = J.clone()
    J2[row] *= scale
    d = torch.ones(T, dtype=torch.float64)
    d[row] = scale
    with gradops.use_backend(backend):
        G = gradops.gram(J).double()
        G2 = gradops.gram(J2).double()
    expected = d[:, None] * G * d[None, :]
    bound = 2 * _tol(J2) + abs(scale) * _tol(J) * d.abs()[:, None]
    assert bool(((G2 - expected).abs() <= bound).all())


@CASES
@given(backend=backends, T=st.integers(1, 9), P=st.integers(0, 600), L=st.integers(1, 30),
       seed=st.integers(0, 999), dtype=dtypes)
def test_segments_sum_to_gram(backend, T, P, L, seed, dtype):
    J = make_J(T, P, dtype, seed=seed)
    offsets = random_offsets(P, L, seed=seed)
    with gradops.use_backend(backend):
        Gl = gradops.segment_gram(J, offsets)
        G = gradops.gram(J)
    assert Gl.shape == (L, T, T)
    assert bool(((Gl.sum(0).double() - G.double()).abs() <= 2 * _tol(J)).all())


@CASES
@given(backend=backends, T=st.integers(2, 8), P=st.integers(1, 400), seed=st.integers(0, 999))
def test_gram_form_equals_vector_form(backend, T, P, seed):
    """Quantities read off G equal those computed on the vectors: norms and cosines."""
    J = make_J(T, P, seed=seed)
    with gradops.use_backend(backend):
        G = gradops.gram(J)
    Jd = J.double()
    n = Jd.norm(dim=1)
    assert torch.allclose(gradops.metrics.norms(G).double(), n, rtol=1e-5, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(Jd[:, None, :], Jd[None, :, :], dim=-1)
    assert torch.allclose(gradops.metrics.cosine(G).double(), cos, atol=1e-5)
