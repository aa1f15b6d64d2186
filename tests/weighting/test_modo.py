"""MoDo (Chen et al., NeurIPS 2023): checked against TorchJD 0.18's ``MoDoWeighting``, on the
single-batch Gram (what the registry method computes) and on a double-sampling cross-Gram
``J_1 J_2^T`` (:func:`modo_update`)."""
import math

import pytest
import torch
from torchjd.aggregation import MoDoWeighting

from gradops.optim import MTLOptimizer
from gradops.weighting import MoDo, StepContext, get_method
from gradops.weighting._modo import modo_update
from test_registry import _Net

CTX = StepContext(dtype=torch.float64)


def _Js(T=4, P=9, steps=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, P, generator=g, dtype=dtype) for _ in range(steps)]


def test_declaration_and_options():
    assert get_method("MoDo") is MoDo and MoDo.kind == "gram"
    assert not MoDo.scale_invariant and not MoDo.random and not MoDo.iterative
    assert (MoDo().options.gamma, MoDo().options.rho) == (0.1, 0.1)
    with pytest.raises(ValueError, match="option 'gamma' must be a finite float > 0"):
        MoDo(gamma=0.0)
    with pytest.raises(ValueError, match="option 'rho' must be a finite float >= 0"):
        MoDo(rho=-0.1)
    with pytest.raises(ValueError, match="option 'rho' must be a finite float >= 0"):
        MoDo(rho=math.nan)


@pytest.mark.parametrize("opts", [{}, {"gamma": 0.5, "rho": 0.0}, {"gamma": 3.0, "rho": 1.0}])
@pytest.mark.parametrize("T", [2, 4, 8])
def test_agrees_with_torchjds_modo_weighting_over_several_steps(opts, T):
    m, ref = MoDo(**opts), MoDoWeighting(**opts)
    for J in _Js(T=T, seed=T, steps=5):
        w, status = m.weights(J @ J.T, CTX)
        assert status is None
        torch.testing.assert_close(w, ref(J @ J.T), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.lam, ref._lambda, rtol=0, atol=1e-12)


def test_double_sampling_cross_gram_agrees_with_torchjd():
    """``modo_update`` on ``G = J_1 J_2^T`` (not symmetric), as in TorchJD's two-batch
    example and LibMTL's ``grads[0] @ (grads[1]^T @ lambd)``."""
    ref = MoDoWeighting(gamma=0.3, rho=0.05)
    lam = torch.full((5,), 0.2, dtype=torch.float64)
    Js = _Js(T=5, steps=6, seed=3)
    for J1, J2 in zip(Js[::2], Js[1::2]):
        G = J1 @ J2.T
        lam = modo_update(G, lam, 0.3, 0.05)
        torch.testing.assert_close(lam, ref(G), rtol=0, atol=1e-12)
        libmtl = modo_update(G, lam, 0.3, 0.05)      # LibMTL's product order, same values
        torch.testing.assert_close(libmtl, modo_update(J1 @ (J2.T), lam, 0.3, 0.05))


def test_torchjd_counterpart_aggregates_the_same_update():
    m = MoDo(gamma=0.2)
    agg = m.torchjd(3)
    for J in _Js(T=3, steps=3, dtype=torch.float32):
        w, _ = m.weights(J @ J.T, StepContext())
        torch.testing.assert_close(w @ J, agg(J), rtol=1e-5, atol=1e-6)


def test_pinned_values():
    """Two steps on a tiny Gram (computed by this implementation after it agreed with TorchJD,
    and by hand: step 1, lambda - 0.1 (G + 0.1 I) lambda = [.295, .485], tau = -.11 ->
    [.405, .595]; step 2, [.23895, .57715], tau = -.09195 -> [.3309, .6691])."""
    G = torch.tensor([[4.0, 0.0], [0.0, 0.2]], dtype=torch.float64)
    m = MoDo()
    w1, _ = m.weights(G, CTX)
    torch.testing.assert_close(w1, torch.tensor([0.405, 0.595], dtype=torch.float64))
    w2, _ = m.weights(G, CTX)
    torch.testing.assert_close(w2, torch.tensor([0.3309, 0.6691], dtype=torch.float64))


def test_nonfinite_gram_gives_nan_and_keeps_lambda():
    m = MoDo()
    J = _Js(T=3, steps=1)[0]
    m.weights(J @ J.T, CTX)
    lam = m.lam.clone()
    G = J @ J.T
    G[2, 2] = math.inf
    w, _ = m.weights(G, CTX)
    assert torch.isnan(w).all() and torch.equal(m.lam, lam)


def test_one_step_is_permutation_equivariant_with_the_state_permuted():
    """The registry's shared check reuses one method object across problems, which a stateful
    method cannot pass; this is the check for one step from a given state."""
    Js = _Js(T=5, steps=2, seed=9)
    pi = torch.tensor([3, 4, 0, 1, 2])
    a = MoDo()
    a.weights(Js[0] @ Js[0].T, CTX)
    b = MoDo()
    b.load_state_dict({"modo_lambda": a.lam[pi]})
    J = Js[1]
    wa, _ = a.weights(J @ J.T, CTX)
    wb, _ = b.weights(J[pi] @ J[pi].T, CTX)
    torch.testing.assert_close(wb, wa[pi], rtol=0, atol=1e-12)


def test_state_dict_round_trip_and_checks():
    m = MoDo()
    J = _Js(T=3, steps=1)[0]
    m.weights(J @ J.T, CTX)
    r = MoDo()
    r.load_state_dict(m.state_dict())
    assert torch.equal(r.weights(J @ J.T, CTX)[0], m.weights(J @ J.T, CTX)[0])
    with pytest.raises(ValueError, match="state holds 3 weights, got a Gram of 2 tasks"):
        r.weights(torch.eye(2, dtype=torch.float64), CTX)
    with pytest.raises(ValueError, match="unknown state keys"):
        MoDo().load_state_dict({"lam": m.lam})
    assert MoDo().state_dict() == {}


def test_mtloptimizer_steps_follow_torchjd():
    net = _Net(3)
    opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="modo",
                       shared=net.encoder, linear_gram="off")
    ref = MoDoWeighting()
    g = torch.Generator().manual_seed(4)
    params = list(net.encoder.parameters())
    for _ in range(2):
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
        losses = net.losses(x, y)
        J = torch.stack([torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(
            L, params, retain_graph=True)]) for L in losses])
        expect = ref(J @ J.T) @ J
        opt.zero_grad()
        opt.backward(losses)
        got = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
        opt.step()
