"""DB-MTL (Lin et al. 2023) against LibMTL's DB_MTL.backward rewritten in vector form (log
losses, ``grad_buffer`` EMA of the gradients, ``alpha = max norm / (norm + 1e-8)``): the same
update with ``beta = 0``; with ``beta > 0`` this module's documented EMA of the norms (a
vector-form oracle from the row norms of J) and its exact relation to LibMTL's update for
constant gradients."""
import math

import pytest
import torch

from gradops.weighting import DBMTL, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


class LibMTLDBMTL:
    """LibMTL/weighting/DB_MTL.py, given the gradients of log(losses + 1e-8) [T, P]."""

    def __init__(self, T, P, beta, beta_sigma):
        self.step, self.beta, self.sigma = 0, beta, beta_sigma
        self.grad_buffer = torch.zeros(T, P, dtype=torch.float64)

    def new_grads(self, batch_grads):
        self.step += 1
        self.grad_buffer = batch_grads + (self.beta / self.step ** self.sigma) * (
            self.grad_buffer - batch_grads)
        u_grad = self.grad_buffer.norm(dim=-1)
        alpha = u_grad.max() / (u_grad + 1e-8)
        return sum(alpha[i] * self.grad_buffer[i] for i in range(len(alpha)))


def norm_ema_oracle(Js, beta, sigma):
    """This module's rule in vector form: EMA of the row norms of J, w = max nu / (nu + eps)."""
    nu, out = torch.zeros(Js[0].shape[0], dtype=torch.float64), []
    for k, J in enumerate(Js, start=1):
        n = J.norm(dim=1)
        nu = n + beta / k ** sigma * (nu - n)
        out.append((nu.max() / (nu + 1e-8)) @ J)
    return out


def _Js(T=3, P=9, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, P, generator=g, dtype=torch.float64) *
            torch.tensor([[1.0], [5.0], [0.2]], dtype=torch.float64)[:T] for _ in range(steps)]


def _run(m, Js):
    out = []
    for J in Js:
        w, status = m.weights(J @ J.T, StepContext(dtype=torch.float64))
        assert bool(status.converged)
        out.append(w @ J)
    return out


def test_declaration_and_options():
    assert get_method("DB_MTL") is DBMTL and DBMTL.weights_from_gram
    assert not DBMTL.scale_invariant and DBMTL().torchjd(3) is None
    for bad, match in [({"beta": 1.0}, "'beta' must be in"), ({"beta_sigma": -1.0},
                       "'beta_sigma' must be >= 0"), ({"eps": -1.0}, "'eps' must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            DBMTL(**bad)


def test_terms_are_log_losses():
    m = setup_method("db-mtl", 3)
    x = torch.tensor([0.7, 2.0, -0.4], dtype=torch.float64, requires_grad=True)
    L = [x[0] ** 2 + 0.1, (x[1] - 1) ** 2 + 0.5, 3 * x[2] ** 2 + x[0] * x[1] + 1.0]
    v = torch.stack([l.detach() for l in L])
    for t in range(3):
        g, = torch.autograd.grad(m.terms(L, v, StepContext())[t], x, retain_graph=True)
        ref, = torch.autograd.grad(torch.log(L[t] + 1e-8), x)
        torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_beta_zero_is_libmtls_update(sigma):
    Js = _Js()
    ours = _run(setup_method("db-mtl", 3, beta=0.0, beta_sigma=sigma), Js)
    lib = LibMTLDBMTL(3, 9, 0.0, sigma)
    worst = max(float((d - lib.new_grads(J)).abs().max()) for d, J in zip(ours, Js))
    assert worst < 1e-12
    print(f"DB-MTL beta=0 sigma={sigma}: max abs diff vs LibMTL {worst:.3g}")


@pytest.mark.parametrize("beta,sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_ema_of_norms_follows_its_vector_form(beta, sigma):
    Js = _Js(seed=1)
    ours = _run(setup_method("db-mtl", 3, beta=beta, beta_sigma=sigma), Js)
    refs = norm_ema_oracle(Js, beta, sigma)
    for d, ref in zip(ours, refs):
        torch.testing.assert_close(d, ref, rtol=1e-12, atol=1e-12)
    print(f"DB-MTL beta={beta} sigma={sigma}: max abs diff vs the EMA-of-norms oracle "
          f"{max(float((d - r).abs().max()) for d, r in zip(ours, refs)):.3g}")


def test_constant_gradients_differ_from_libmtl_by_its_ema_bias():
    """LibMTL's update = (1 - prod_j beta_j) x this one when the gradients do not change."""
    J = _Js(steps=1)[0]
    ours = _run(setup_method("db-mtl", 3, beta=0.9), [J] * 4)
    lib = LibMTLDBMTL(3, 9, 0.9, 0.0)
    for k, d in enumerate(ours, start=1):
        torch.testing.assert_close(lib.new_grads(J), (1 - 0.9 ** k) * d, rtol=1e-12,
                                   atol=1e-12)


def test_pinned_weights():
    """Pinned from this implementation after it agreed with the oracles above."""
    m = setup_method("db-mtl", 2, beta=0.5)
    G1 = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))      # norms 2, 1
    G2 = torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))      # norms 1, 3
    w1, _ = m.weights(G1, StepContext(dtype=torch.float64))
    w2, _ = m.weights(G2, StepContext(dtype=torch.float64))
    # nu1 = [1, 0.5] -> w = [1, 2]; nu2 = [1, 1.75] -> w = [1.75, 1]
    torch.testing.assert_close(w1, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(w2, torch.tensor([1.75, 1.0], dtype=torch.float64))
    state = m.state_dict()
    assert state["step"] == 2
    torch.testing.assert_close(state["nu"], torch.tensor([1.0, 1.75], dtype=torch.float64))


def test_nonfinite_gram_gives_nan_and_keeps_the_ema():
    m = setup_method("db-mtl", 2)
    m.weights(torch.eye(2), StepContext())
    nu = m.nu.clone()
    w, status = m.weights(torch.tensor([[math.nan, 0.0], [0.0, 1.0]]), StepContext())
    assert torch.isnan(w).all() and not bool(status.converged)
    assert torch.equal(m.nu, nu) and m.step == 2


def test_mtloptimizer_steps_match_the_oracle():
    model = TwoTask()
    opt = optimizer(model, "db-mtl")
    x, y = batch()
    shared = list(model.encoder.parameters())
    Js, got = [], []
    for _ in range(3):
        L = model.losses(x, y)
        Js.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            torch.log(L[t] + 1e-8), shared, retain_graph=True)]) for t in range(2)]).double())
        opt.zero_grad()
        opt.backward(L)
        got.append(torch.cat([p.grad.reshape(-1) for p in shared]).double())
        opt.step()
    refs = norm_ema_oracle(Js, 0.9, 0.0)
    for d, ref in zip(got, refs):
        torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-5)
    print("DB-MTL MTLOptimizer 3 steps: max abs diff vs the oracle "
          f"{max(float((d - r).abs().max()) for d, r in zip(got, refs)):.3g}")
