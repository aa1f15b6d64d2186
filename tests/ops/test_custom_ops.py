"""torch.library integration: opcheck on every custom op, torch.compile(fullgraph=True),
autograd."""
from __future__ import annotations

import pytest
import torch

import gradops

from helpers import make_J

OPS = {
    "gram": lambda J, o: (J,),
    "gram_sign_counts": lambda J, o: (J,),
    "segment_gram": lambda J, o: (J, o),
    "segment_gram_sign_counts": lambda J, o: (J, o),
}


def _samples(differentiable: bool):
    offsets = torch.tensor([0, 3, 3, 40, 101])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for T in (1, 3, 8):
            J = make_J(T, 101, dtype, seed=T)
            yield J, offsets
            yield make_J(T, 101, dtype, layout="row_view", seed=T), offsets
    if differentiable:
        yield make_J(4, 101, seed=0).requires_grad_(), offsets


@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(cpu_backend, name):
    op = getattr(torch.ops.gradops, name).default
    differentiable = name in ("gram", "segment_gram")
    for J, offsets in _samples(differentiable and cpu_backend != "triton"):
        torch.library.opcheck(op, OPS[name](J, offsets))


def test_opcheck_backward_op():
    grad = torch.randn(4, 5, 5)
    J = make_J(5, 60, seed=1)
    torch.library.opcheck(torch.ops.gradops.segment_gram_backward.default,
                          (grad, J, torch.tensor([0, 10, 10, 59, 60])))


def test_autograd_matches_reference():
    J = make_J(4, 50, seed=3).double().float().requires_grad_()
    offsets = torch.tensor([0, 20, 20, 50])
    W = torch.randn(3, 4, 4)
    (gradops.segment_gram(J, offsets) * W).sum().backward()
    g_ours = J.grad.clone()
    J.grad = None
    Jr = J.detach().clone().requires_grad_()
    ref = torch.stack([Jr[:, a:b] @ Jr[:, a:b].T for a, b in ((0, 20), (20, 20), (20, 50))])
    (ref * W).sum().backward()
    assert torch.allclose(g_ours, Jr.grad, atol=1e-5)
    J.grad = None
    (gradops.gram(J) * W[0]).sum().backward()
    Jr.grad = None
    ((Jr @ Jr.T) * W[0]).sum().backward()
    assert torch.allclose(J.grad, Jr.grad, atol=1e-5)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def stats(J, offsets):
        G = gradops.gram(J)
        Gl = gradops.segment_gram(J, offsets)
        counted = gradops.gram(J, return_sign_counts=True)
        ratio = gradops.metrics.sign_conflict_ratio(counted.opposite, counted.both_nonzero)
        return (G, gradops.metrics.conflict_incidence(G),
                gradops.metrics.conflict_counts(Gl, -0.1), gradops.metrics.gms(Gl), ratio)

    J = make_J(5, 999, seed=7)
    offsets = torch.tensor([0, 100, 100, 999])
    G, inc, counts, g, ratio = stats(J, offsets)
    assert torch.allclose(G, gradops.gram(J))
    assert torch.equal(counts,
                       gradops.metrics.conflict_counts(gradops.segment_gram(J, offsets), -0.1))
    assert inc.shape == () and counts.shape == (3,)
    assert g.shape == (3, 5, 5) and ratio.shape == (5, 5)


def _method_samples():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for T in (1, 3, 8):
            yield make_J(T, 101, dtype, seed=T), torch.randn(T, generator=g)
    yield make_J(4, 101, layout="row_view", seed=9), torch.randn(4, generator=g)


def test_opcheck_combine(cpu_backend):
    offsets = torch.tensor([0, 3, 3, 40, 101])
    for J, w in _method_samples():
        torch.library.opcheck(torch.ops.gradops.combine.default, (J, w, None))
        torch.library.opcheck(torch.ops.gradops.combine.default,
                              (J, w.expand(4, -1).contiguous(), offsets))
        out = torch.empty(101, dtype=J.dtype)
        torch.library.opcheck(torch.ops.gradops.combine_out.default, (J, w, None, out))


def test_opcheck_graddrop(cpu_backend):
    for J, _ in _method_samples():
        T, P = J.shape
        leak = torch.full((T,), 0.25)
        seed = torch.tensor([1234])
        torch.library.opcheck(torch.ops.gradops.graddrop.default, (J, leak, seed, None, True, 1e-7))
        torch.library.opcheck(torch.ops.gradops.graddrop.default,
                              (J, leak, seed, torch.rand(P), False, 1e-7))


def test_opcheck_pcgrad_weights(cpu_backend):
    for T in (1, 2, 5, 13):
        J = make_J(T, 50, seed=T)
        G = gradops.gram(J)
        perms = gradops.random_orders(T, generator=torch.Generator().manual_seed(T))
        for reduction in ("sum", "mean"):
            torch.library.opcheck(torch.ops.gradops.pcgrad_weights.default,
                                  (G, perms, reduction, 0.0))
        Gl = gradops.segment_gram(J, torch.tensor([0, 20, 50]))
        perms_l = gradops.random_orders(T, (2,), generator=torch.Generator().manual_seed(T))
        torch.library.opcheck(torch.ops.gradops.pcgrad_weights.default, (Gl, perms_l, "sum", 0.0))
        torch.library.opcheck(torch.ops.gradops.pcgrad_weights.default,
                              (Gl, perms_l, "sum", 0.0, True))   # LibMTL's self-visit


def test_torch_compile_methods_fullgraph():
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def step(J, perms, noise, out):
        g1 = gradops.pcgrad(J, perms=perms)
        g2 = gradops.graddrop(J, noise=noise)
        gradops.combine(J, torch.ones(J.shape[0]), out=out)
        return g1, g2

    J = make_J(4, 777, seed=1)
    perms = gradops.random_orders(4, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(777)
    out = torch.empty(777)
    g1, g2 = step(J, perms, noise, out)
    torch.testing.assert_close(g1, gradops.pcgrad(J, perms=perms))
    torch.testing.assert_close(g2, gradops.graddrop(J, noise=noise))
    torch.testing.assert_close(out, J.sum(0), rtol=1e-5, atol=1e-5)


# --- float64: the torch path (float64 accumulation) behind every custom op --------------------
def _float64_samples():
    offsets = torch.tensor([0, 3, 3, 40, 101])
    for T in (1, 3):
        yield make_J(T, 101, torch.float64, seed=T), offsets
    yield make_J(4, 101, torch.float64, layout="row_view", seed=4), offsets


@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck_float64(name):
    op = getattr(torch.ops.gradops, name).default
    samples = list(_float64_samples())
    if name in ("gram", "segment_gram"):
        samples.append((make_J(3, 101, torch.float64, seed=5).requires_grad_(), samples[0][1]))
    for J, offsets in samples:
        args = OPS[name](J, offsets)
        out = op(*args)
        assert (out if isinstance(out, torch.Tensor) else out[0]).dtype == torch.float64
        torch.library.opcheck(op, args)


def test_opcheck_float64_backward_op():
    grad = torch.randn(4, 5, 5, dtype=torch.float64)
    J = make_J(5, 60, torch.float64, seed=1)
    torch.library.opcheck(torch.ops.gradops.segment_gram_backward.default,
                          (grad, J, torch.tensor([0, 10, 10, 59, 60])))


def test_opcheck_float64_methods():
    offsets = torch.tensor([0, 3, 3, 40, 101])
    g = torch.Generator().manual_seed(0)
    for J, _ in _float64_samples():
        T, P = J.shape
        w = torch.randn(T, generator=g, dtype=torch.float64)
        torch.library.opcheck(torch.ops.gradops.combine.default, (J, w, None))
        torch.library.opcheck(torch.ops.gradops.combine.default,
                              (J, w.expand(4, -1).contiguous(), offsets))
        torch.library.opcheck(torch.ops.gradops.combine_out.default,
                              (J, w, None, torch.empty(P, dtype=torch.float64)))
        # a float32 J into a float64 destination (float32 math, rounded into float64)
        torch.library.opcheck(torch.ops.gradops.combine_out.default,
                              (J.float(), w.float(), None, torch.empty(P, dtype=torch.float64)))
        seed = torch.tensor([1234])
        for leak in (torch.full((T,), 0.25), torch.full((T,), 0.1, dtype=torch.float64)):
            torch.library.opcheck(torch.ops.gradops.graddrop.default,
                                  (J, leak, seed, None, True, 1e-7))
        torch.library.opcheck(torch.ops.gradops.graddrop.default,
                              (J, leak, seed, torch.rand(P, dtype=torch.float64), False, 1e-7))
        G = gradops.gram(J)
        perms = gradops.random_orders(T, generator=torch.Generator().manual_seed(T))
        assert torch.ops.gradops.pcgrad_weights(G, perms, "sum", 0.0).dtype == torch.float64
        torch.library.opcheck(torch.ops.gradops.pcgrad_weights.default, (G, perms, "mean", 0.0))
        Gl = gradops.segment_gram(J, offsets)
        perms_l = gradops.random_orders(T, (4,), generator=torch.Generator().manual_seed(T))
        torch.library.opcheck(torch.ops.gradops.pcgrad_weights.default, (Gl, perms_l, "sum", 0.0))
        torch.library.opcheck(torch.ops.gradops.pcgrad_weights.default,
                              (Gl, perms_l, "sum", 0.0, True))   # LibMTL's self-visit
