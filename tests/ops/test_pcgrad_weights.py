"""PCGrad in Gram form against the vector form of the paper (pair-by-pair projections)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradops
from gradops.reference import pcgrad_reference

from backend_lists import cpu_backends
from helpers import make_J, random_offsets


def _orders(T, seed, batch=()):
    return gradops.random_orders(T, batch, generator=torch.Generator().manual_seed(seed))


def _assert_close(g, ref, J, rtol):
    scale = J.double().abs().sum(0).max().item() * J.shape[0] + 1e-30
    assert torch.allclose(g.double(), ref.double(), rtol=rtol, atol=rtol * scale), \
        (g.double() - ref.double()).abs().max()


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 13, 40])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_vector_form_fp64_weights(T, reduction):
    """Gram form == vector form with the same orders, computed in fp64 end to end."""
    J = make_J(T, 301, seed=T).double()
    perms = _orders(T, seed=T)
    G = J @ J.T
    w = gradops.pcgrad_weights(G, perms=perms, reduction=reduction)  # fp32 recurrence
    Gd_w = _weights_fp64(G, perms, reduction)
    ref = pcgrad_reference(J, perms, reduction)
    torch.testing.assert_close(Gd_w @ J, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w.double(), Gd_w, rtol=2e-4, atol=2e-4 * Gd_w.abs().max().item())


def _weights_fp64(G, perms, reduction, self_visit=False):
    """The Gram-form recurrence in fp64 (the same algorithm as the op, for the fp64 check)."""
    T = G.shape[0]
    C = torch.eye(T, dtype=torch.float64)
    for i in range(T):
        for j in perms[i].tolist():
            if j == i and not self_visit:
                continue
            d = C[i] @ G[:, j]
            if d < 0:
                C[i, j] -= d / G[j, j]
    w = C.sum(0)
    return w / T if reduction == "mean" else w


@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 40])
def test_pcgrad_matches_vector_form_fp32(cpu_backend, T):
    P = 2000 if cpu_backend == "triton" else 20_000
    J = make_J(T, P, seed=10 + T)
    perms = _orders(T, seed=T)
    g = gradops.pcgrad(J, perms=perms)
    ref = pcgrad_reference(J.double(), perms)
    _assert_close(g, ref, J, rtol=1e-4)


@pytest.mark.parametrize("case", ["orthogonal", "parallel", "antiparallel", "zero", "all_zero",
                                  "duplicate_conflict"])
def test_degenerate_geometries(cpu_backend, case):
    e = torch.eye(4, 64)
    J = {
        "orthogonal": e[:3] * torch.tensor([[1.0], [2.0], [3.0]]),
        "parallel": torch.stack([e[0], 2 * e[0], 0.5 * e[0]]),
        "antiparallel": torch.stack([e[0], -2 * e[0], e[1]]),
        "zero": torch.stack([e[0] - e[1], torch.zeros(64), -e[0]]),
        "all_zero": torch.zeros(3, 64),
        "duplicate_conflict": torch.stack([e[0] + e[1], e[0] + e[1], -e[0]]),
    }[case]
    for seed in range(4):
        perms = _orders(3, seed)
        g = gradops.pcgrad(J, perms=perms)
        assert torch.isfinite(g).all()
        ref = pcgrad_reference(J.double(), perms)
        torch.testing.assert_close(g.double(), ref, rtol=1e-6, atol=1e-6)
    if case == "orthogonal":  # no conflict: plain sum
        torch.testing.assert_close(gradops.pcgrad(J), J.sum(0))
    if case == "antiparallel":  # e0 and -2 e0 project each other away entirely
        torch.testing.assert_close(gradops.pcgrad(J, perms=_orders(3, 0)), e[1])


def test_T2_does_not_depend_on_order(cpu_backend):
    J = make_J(2, 500, seed=4)
    J[1] = -J[1] + 0.3 * J[0]  # conflicting pair
    base = gradops.pcgrad(J, perms=torch.tensor([[0, 1], [0, 1]]))
    for perms in ([[1, 0], [1, 0]], [[0, 1], [1, 0]], [[1, 0], [0, 1]]):
        torch.testing.assert_close(gradops.pcgrad(J, perms=torch.tensor(perms)), base)


def test_same_seed_same_result_and_mean(cpu_backend):
    J = make_J(6, 3000, seed=5)
    a = gradops.pcgrad(J, generator=torch.Generator().manual_seed(3))
    b = gradops.pcgrad(J, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    m = gradops.pcgrad(J, generator=torch.Generator().manual_seed(3), reduction="mean")
    torch.testing.assert_close(m, a / 6)


def test_per_segment_pcgrad(cpu_backend):
    T, P, L = 4, 3000, 6
    J = make_J(T, P, seed=1)
    offsets = random_offsets(P, L, seed=2)
    perms = _orders(T, 3, batch=(L,))
    g, w = gradops.pcgrad(J, perms=perms, offsets=offsets, return_weights=True)
    assert w.shape == (L, T)
    o = offsets.tolist()
    for l, (a, b) in enumerate(zip(o[:-1], o[1:])):
        ref = pcgrad_reference(J[:, a:b].double(), perms[l])
        _assert_close(g[a:b], ref, J[:, a:b] if b > a else J[:, :1], rtol=1e-4)


def test_nonfinite_propagates(cpu_backend):
    J = make_J(3, 100, seed=0)
    J[1, 10] = float("nan")
    g = gradops.pcgrad(J, perms=_orders(3, 0))
    assert torch.isnan(g).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(cpu_backend, dtype):
    J = make_J(5, 4000, dtype, seed=7)
    perms = _orders(5, 1)
    g = gradops.pcgrad(J, perms=perms)
    assert g.dtype == dtype
    ref = pcgrad_reference(J.double(), perms)
    _assert_close(g, ref, J, rtol=1e-2)


def test_errors():
    G = torch.eye(3)
    with pytest.raises(ValueError, match="perms must be int64 of G's shape"):
        gradops.pcgrad_weights(G, perms=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must be a permutation"):
        gradops.pcgrad_weights(G, perms=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        gradops.pcgrad_weights(G, reduction="max")
    with pytest.raises(ValueError, match="G must be a Gram"):
        gradops.pcgrad_weights(torch.ones(3, 4))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(backend=st.sampled_from(cpu_backends()), T=st.integers(1, 9), P=st.integers(1, 200),
       seed=st.integers(0, 10_000), scale=st.sampled_from([1e-15, 1e-3, 1.0, 1e3, 1e15]))
def test_property_vector_form_and_scale_invariance(backend, T, P, seed, scale):
    """TorchJD-style sweep: equal to the vector form at every scale, and
    PCGrad(aJ) = a PCGrad(J)."""
    J = make_J(T, P, seed=seed).double()
    G = J @ J.T
    perms = _orders(T, seed)
    with gradops.use_backend(backend):
        w1 = gradops.pcgrad_weights(G.float(), perms=perms)
        w2 = gradops.pcgrad_weights((G * scale * scale).float(), perms=perms)
    torch.testing.assert_close(w2, w1, rtol=1e-3, atol=1e-3)
    ref = pcgrad_reference(J, perms)
    got = w1.double() @ J
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3 * J.abs().sum(0).max().item() * T)
    # for T = 2 the PCGrad direction never conflicts with either task (Yu et al., §3)
    if T == 2:
        assert bool((J @ got >= -1e-6 * (J.norm() ** 2)).all())


def _self_visit_case():
    """A 20 x 10 problem (random orders) on which LibMTL's self-visit changes the result: a
    projection makes ``g_i' . g_i < 0`` and the self-visit projects again."""
    g = torch.Generator().manual_seed(161)
    J = torch.randn(20, 10, generator=g)
    return J, gradops.random_orders(20, generator=g)


@pytest.mark.parametrize("self_visit", [False, True])
def test_self_visit_option_matches_its_vector_form(cpu_backend, self_visit):
    """Default ``j != i`` (the paper's Alg. 1) and ``libmtl_self_visit=True`` (LibMTL's), each
    against the vector form with the same convention, on every backend; and they differ."""
    J, perms = _self_visit_case()
    g = gradops.pcgrad(J, perms=perms, libmtl_self_visit=self_visit)
    ref = pcgrad_reference(J.double(), perms, libmtl_self_visit=self_visit)
    _assert_close(g, ref, J, rtol=1e-5)
    other = pcgrad_reference(J.double(), perms, libmtl_self_visit=not self_visit)
    assert (ref - other).abs().max() > 1e-2 * J.norm(dim=1).max()
    Gd = J.double() @ J.double().T
    torch.testing.assert_close(_weights_fp64(Gd, perms, "sum", self_visit) @ J.double(), ref,
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("per_layer", [False, True])
def test_self_visit_option_reaches_the_weighting_and_the_optimizer(per_layer):
    """``weighting.pcgrad`` and ``MTLOptimizer`` (whole-model and per layer) pass
    ``libmtl_self_visit`` through: the same orders give the op's weights of that convention."""
    from gradops.optim import MTLOptimizer
    J, perms = _self_visit_case()
    G = J @ J.T
    for sv in (False, True):
        torch.testing.assert_close(gradops.weighting.pcgrad(G, perms=perms, libmtl_self_visit=sv),
                                   gradops.pcgrad_weights(G, perms=perms, libmtl_self_visit=sv))
    # one shared 10-vector, task t's loss = J_t . x: the per-task gradients are the rows of J
    x = torch.nn.Parameter(torch.zeros(10))
    for sv in (False, True):
        opt = MTLOptimizer(torch.optim.SGD([x], lr=0.0), method="pcgrad", shared=[x],
                           per_layer=per_layer, libmtl_self_visit=sv,
                           generator=torch.Generator().manual_seed(3))
        gen = torch.Generator().set_state(opt._generator.get_state())
        opt.zero_grad()
        opt.backward([J[t] @ x for t in range(20)])
        orders = gradops.random_orders(20, generator=gen)
        ref = pcgrad_reference(J.double(), orders, libmtl_self_visit=sv)
        _assert_close(x.grad, ref, J, rtol=1e-5)


def test_equals_torchjd_pcgrad_with_the_same_orders(cpu_backend):
    """With TorchJD's random orders (``torch.randperm`` per task from the global RNG) gradops'
    default (``j != i``, the paper's Alg. 1) gives TorchJD's ``PCGrad`` weights."""
    pytest.importorskip("torchjd")
    from torchjd.aggregation._pcgrad import PCGradWeighting
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        T = (20, 8, 3, 13, 40)[seed]
        J = torch.randn(T, 10, generator=g, dtype=torch.float64)
        G = J @ J.T
        torch.manual_seed(seed)
        w_jd = PCGradWeighting()(G)
        torch.manual_seed(seed)
        perms = torch.stack([torch.randperm(T) for _ in range(T)])
        w = gradops.pcgrad_weights(G.float(), perms=perms)
        m = J.norm(dim=1).max()
        err = ((w.double() - w_jd) @ J).abs().max() / m
        assert err < 2e-6, (seed, float(err))
        if cpu_backend == "torch":   # float64 takes the torch path (fp64 math)
            w64 = gradops.pcgrad_weights(G, perms=perms)
            assert ((w64 - w_jd) @ J).abs().max() / m < 1e-12
