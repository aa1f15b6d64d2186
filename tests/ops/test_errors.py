"""Bad input gets a clear error naming the argument."""
from __future__ import annotations

import pytest
import torch

import gradops


@pytest.mark.parametrize("J,match", [
    (torch.randn(10), r"J must be 2-D \[T, P\]"),
    (torch.randn(2, 3, 4), r"J must be 2-D"),
    (torch.randn(0, 5), r"at least one row"),
    (torch.ones(3, 5, dtype=torch.int32),
     r"J must be float32, bfloat16, float16 or float64, got torch.int32"),
    (torch.ones(3, 5, dtype=torch.complex64),
     r"J must be float32, bfloat16, float16 or float64, got torch.complex64"),
    (torch.ones(3, 5, dtype=torch.bool), r"J must be float32, .* got torch.bool"),
])
def test_bad_J(J, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gradops.gram(J)
    with pytest.raises((ValueError, TypeError), match=match):
        gradops.segment_gram(J, torch.tensor([0, J.shape[-1] if J.dim() else 0]))


def test_J_not_a_tensor():
    with pytest.raises(TypeError, match="J must be a torch.Tensor"):
        gradops.gram([[1.0, 2.0]])


@pytest.mark.parametrize("offsets,match", [
    (torch.tensor([0, 5], dtype=torch.int32), r"offsets must be int64"),
    (torch.tensor([0.0, 5.0]), r"offsets must be int64"),
    (torch.tensor([[0, 5]]), r"offsets must be 1-D"),
    (torch.tensor([0]), r"offsets must be 1-D \[L\+1\] with L >= 1"),
    (torch.tensor([1, 5]), r"offsets\[0\] must be 0"),
    (torch.tensor([0, 4]), r"offsets must end at P = 5"),
    (torch.tensor([0, 6]), r"offsets must end at P = 5"),
    (torch.tensor([0, 3, 2, 5]),
     r"offsets must be non-decreasing, got offsets\[1\] = 3 > offsets\[2\] = 2"),
    (torch.tensor([0, 5], device="meta"), r"offsets must be on the CPU or on J's device"),
])
def test_bad_offsets(offsets, match):
    J = torch.randn(3, 5)
    with pytest.raises((ValueError, TypeError), match=match):
        gradops.segment_gram(J, offsets)
    with pytest.raises((ValueError, TypeError), match=match):
        gradops.segment_gram(J, offsets, return_sign_counts=True)


def test_offsets_not_a_tensor():
    with pytest.raises(TypeError, match="offsets must be a torch.Tensor of int64"):
        gradops.segment_gram(torch.randn(2, 3), [0, 3])


def test_forced_backend_that_cannot_run_says_why():
    J = torch.randn(3, 5)
    with gradops.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="forced backend 'cuda' cannot run this call"):
            gradops.gram(J)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        with gradops.use_backend("numpy"):
            pass


def test_bad_env_backend(monkeypatch):
    monkeypatch.setenv("GRADOPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="GRADOPS_BACKEND must be one of"):
        gradops.gram(torch.randn(2, 3))


def test_env_backend_is_used(monkeypatch):
    monkeypatch.setenv("GRADOPS_BACKEND", "torch")
    assert gradops._backend.select_backend("gram", torch.device("cpu"), 3) == "torch"


def test_triton_never_launched_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = gradops._backend.backend_usable("triton", torch.device("cpu"), {}, 3)
    assert why is not None and "TRITON_INTERPRET=1" in why
    assert gradops._backend.auto_backend(torch.device("cpu"), 3) in ("cpp", "torch")


def test_metrics_bad_G():
    with pytest.raises(ValueError, match=r"G must be \[..., T, T\]"):
        gradops.metrics.cosine(torch.randn(3, 4))
    with pytest.raises(TypeError, match="G must be floating point"):
        gradops.metrics.cosine(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="S must be in"):
        gradops.metrics.conflict_counts(torch.eye(3), S=-2.0)


def test_sparse_J_is_refused_by_name():
    """A sparse J is a TypeError naming J (was "unsupported memory format option")."""
    J = torch.randn(3, 10)
    for op in (gradops.gram, gradops.pcgrad, gradops.graddrop):
        with pytest.raises(TypeError, match=r"J must be a dense \(strided\) tensor, got layout "
                                            r"torch.sparse_coo"):
            op(J.to_sparse())


def test_graddrop_generator_must_be_a_generator():
    J = torch.randn(3, 10)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        gradops.graddrop(J, generator=5)
    g = gradops.graddrop(J, generator=torch.Generator().manual_seed(0))
    assert g.shape == (10,)
