"""The eager fast path (gradops/ops/_eager.py): plain eager CPU calls skip the dispatcher and run
the ops' implementations directly; every other call goes through the custom ops. Both must give
the same result, bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradops
from gradops.ops._eager import plain_eager_cpu


class _Recorder(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _J(T=5, P=1037, seed=0):
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed))


def test_predicate_plain_cpu_tensors():
    J = _J()
    assert plain_eager_cpu(J, None)
    assert not plain_eager_cpu(J.requires_grad_())
    assert not plain_eager_cpu(torch.empty(3, device="meta"))

    class Sub(torch.Tensor):
        pass

    assert not plain_eager_cpu(_J().as_subclass(Sub))
    with _Recorder():
        assert not plain_eager_cpu(_J())
    assert not torch.func.vmap(lambda x: torch.tensor(plain_eager_cpu(x)))(_J()).any()


def test_gram_fast_path_equals_the_op():
    J = _J()
    offsets = torch.tensor([0, 0, 400, 1037])
    assert torch.equal(gradops.gram(J), torch.ops.gradops.gram(J))
    assert torch.equal(gradops.segment_gram(J, offsets), torch.ops.gradops.segment_gram(J, offsets))
    fast = gradops.gram(J, return_sign_counts=True)
    for a, b in zip(fast, torch.ops.gradops.gram_sign_counts(J)):
        assert torch.equal(a, b)
    fast = gradops.segment_gram(J, offsets, return_sign_counts=True)
    for a, b in zip(fast, torch.ops.gradops.segment_gram_sign_counts(J, offsets)):
        assert torch.equal(a, b)


def test_combine_fast_path_equals_the_op():
    J, w = _J(), torch.rand(5)
    assert torch.equal(gradops.combine(J, w), torch.ops.gradops.combine(J, w, None))


def test_other_calls_go_through_the_custom_ops():
    J, w = _J(), torch.rand(5)
    with _Recorder() as rec:
        G = gradops.gram(J)
        g = gradops.combine(J, w)
    assert any("gradops.gram" in n for n in rec.names), rec.names
    assert any("gradops.combine" in n for n in rec.names), rec.names
    assert torch.equal(G, gradops.gram(J)) and torch.equal(g, gradops.combine(J, w))


@pytest.mark.parametrize("op", ["gram", "segment_gram"])
def test_requires_grad_keeps_autograd(op):
    J = _J(3, 64).requires_grad_()
    G = (gradops.gram(J) if op == "gram"
         else gradops.segment_gram(J, torch.tensor([0, 10, 64])).sum(0))
    G.sum().backward()
    # d sum(J J^T) / dJ = 2 * (1 1^T) J
    expected = 2 * torch.ones(3, 3) @ J.detach()
    torch.testing.assert_close(J.grad, expected, rtol=1e-5, atol=1e-5)
