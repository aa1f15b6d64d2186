"""MoCo (Fernando et al., ICLR 2023): checked against a plain oracle that follows LibMTL's
``MoCo.backward`` line by line (TorchJD 0.18 has no MoCo), with the paper's simplex projection
(Algorithm 1, line 6) from TorchJD's ``project_onto_simplex`` for ``lambda_update="simplex"``."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchjd.aggregation._utils.simplex import project_onto_simplex

from gradops.optim import MTLOptimizer
from gradops.weighting import MoCo, StepContext, get_method
from test_registry import _Net


def _oracle(Js, Ls, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0,
            simplex=False):
    """LibMTL's MoCo (init_param: y = 0, lambd = 1/T; backward: per task
    ``grads[tn] / (grads[tn].norm() + 1e-8) * losses[tn]``, ``y -= beta_k (y - grads)``,
    ``lambd = softmax(lambd - gamma_k (y y^T + rho I) lambd)``, ``y^T lambd``), in float64,
    looping over the steps and tasks; ``simplex``: the paper's Pi_Delta instead of softmax."""
    T, P = Js[0].shape
    y = torch.zeros(T, P, dtype=torch.float64)
    lambd = torch.ones(T, dtype=torch.float64) / T
    outs = []
    for step, (J, L) in enumerate(zip(Js, Ls), start=1):
        grads = J.double().clone()
        for tn in range(T):
            grads[tn] = grads[tn] / (grads[tn].norm() + 1e-8) * L[tn]
        y = y - (beta / step ** beta_sigma) * (y - grads)
        arg = lambd - (gamma / step ** gamma_sigma) * (y @ y.t() + rho * torch.eye(T,
                                                       dtype=torch.float64)) @ lambd
        lambd = project_onto_simplex(arg) if simplex else F.softmax(arg, -1)
        outs.append(y.t() @ lambd)
    return outs, y, lambd


def _problem(T=3, P=11, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    Js = [torch.randn(T, P, generator=g) * (1 + 3 * torch.rand(T, 1, generator=g))
          for _ in range(steps)]
    Ls = [0.2 + torch.rand(T, generator=g) * 2 for _ in range(steps)]
    return Js, Ls


def _run(m, Js, Ls, scale=None):
    out = []
    for J, L in zip(Js, Ls):
        s = None if scale is None else torch.tensor(scale)
        out.append(m.combine(J if s is None else J * s, StepContext(losses=L, scale=s)))
    return out


def test_declaration_and_options():
    assert get_method("MoCo") is MoCo and MoCo.kind == "elementwise"
    assert not MoCo.scale_invariant and not MoCo.random
    with pytest.raises(ValueError, match=r"option 'beta' must be in \(0, 1\]"):
        MoCo(beta=0.0)
    with pytest.raises(ValueError, match="option 'gamma' must be a finite float >= 0"):
        MoCo(gamma=-1.0)
    with pytest.raises(ValueError, match="option 'rho' must be a finite float >= 0"):
        MoCo(rho=math.inf)
    with pytest.raises(ValueError, match="option 'lambda_update' must be one of"):
        MoCo(lambda_update="mgda")
    with pytest.raises(ValueError, match="needs the task losses"):
        MoCo().combine(torch.ones(2, 3), StepContext())
    with pytest.raises(ValueError, match="got \\(3,\\) losses for a J of 2 tasks"):
        MoCo().combine(torch.ones(2, 3), StepContext(losses=torch.ones(3)))


@pytest.mark.parametrize("opts", [{}, {"rho": 0.3, "beta": 0.9, "gamma": 0.5},
                                  {"lambda_update": "simplex", "gamma": 2.0, "rho": 0.1},
                                  {"beta_sigma": 0.0, "gamma_sigma": 1.0}])
@pytest.mark.parametrize("T", [2, 3, 6])
def test_agrees_with_libmtls_moco_over_several_steps(opts, T):
    Js, Ls = _problem(T=T, seed=T)
    m = MoCo(**opts)
    got = _run(m, Js, Ls)
    oracle_opts = {k: v for k, v in opts.items() if k != "lambda_update"}
    expect, y, lambd = _oracle(Js, Ls, simplex=opts.get("lambda_update") == "simplex",
                               **oracle_opts)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.y.double(), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.lam.double(), lambd, rtol=1e-5, atol=1e-6)
    assert m.step == 5


def test_pinned_values():
    """Two steps on a tiny J (computed once by this implementation after it agreed with the
    oracle; step 1 by hand: y = 0.5 h = [[.3, .4, 0], [0, -1, 0]], lambda = softmax([.5075,
    .47]) = [.50937, .49063])."""
    J1 = torch.tensor([[3.0, 4.0, 0.0], [0.0, -1.0, 0.0]])
    J2 = torch.tensor([[1.0, 0.0, 1.0], [-2.0, 2.0, 1.0]])
    m = MoCo()
    d1 = m.combine(J1, StepContext(losses=torch.tensor([1.0, 2.0])))
    d2 = m.combine(J2, StepContext(losses=torch.tensor([0.5, 1.5])))
    torch.testing.assert_close(d1, torch.tensor([0.152812, -0.286877, 0.0]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(d2, torch.tensor([-0.013899, -0.014360, 0.150626]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(m.lam, torch.tensor([0.505072, 0.494928]), atol=1e-6, rtol=0)


def test_amp_scale_is_undone_inside():
    """With GradScaler's scale s, J arrives as s J and the update must come back as s d."""
    Js, Ls = _problem()
    plain, scaled = MoCo(), MoCo()
    for a, b in zip(_run(plain, Js, Ls), _run(scaled, Js, Ls, scale=1024.0)):
        torch.testing.assert_close(b, 1024.0 * a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scaled.y, plain.y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", ["J", "loss"])
def test_nonfinite_step_gives_nan_and_keeps_the_state(where):
    Js, Ls = _problem(steps=3)
    m = MoCo()
    _run(m, Js[:2], Ls[:2])
    y, lam = m.y.clone(), m.lam.clone()
    J, L = Js[2].clone(), Ls[2].clone()
    if where == "J":
        J[1, 4] = float("inf")
    else:
        L[0] = float("nan")
    d = m.combine(J, StepContext(losses=L))
    assert torch.isnan(d).all()
    assert torch.equal(m.y, y) and torch.equal(m.lam, lam) and m.step == 3


def test_state_dict_round_trip_and_shape_check():
    Js, Ls = _problem(steps=4)
    m = MoCo()
    _run(m, Js[:2], Ls[:2])
    sd = m.state_dict()
    assert set(sd) == {"moco_y", "moco_lambda", "moco_step"} and sd["moco_y"].shape == (3, 11)
    r = MoCo()
    r.load_state_dict(sd)
    for a, b in zip(_run(m, Js[2:], Ls[2:]), _run(r, Js[2:], Ls[2:])):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"state is for \[T, P\] = \[3, 11\]"):
        r.combine(torch.ones(3, 5), StepContext(losses=torch.ones(3)))
    with pytest.raises(ValueError, match="state lacks"):
        MoCo().load_state_dict({"moco_y": sd["moco_y"]})
    assert MoCo().state_dict() == {}


def test_mtloptimizer_step_uses_the_shared_gradients_and_losses():
    net = _Net(3)
    opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="moco",
                       shared=net.encoder, linear_gram="off")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    losses = net.losses(x, y)
    params = list(net.encoder.parameters())
    J = torch.stack([torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(
        L, params, retain_graph=True)]) for L in losses])
    expect, _, _ = _oracle([J], [torch.stack([L.detach() for L in losses])])
    opt.zero_grad()
    opt.backward(losses)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got.double(), expect[0], rtol=1e-5, atol=1e-6)


def test_grad_scaler_gives_the_unscaled_updates():
    """AMP: scaled losses in, ``unscale_`` -> the updates of an unscaled run, step after step."""
    runs = []
    for use_scaler in (False, True):
        net = _Net(3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None
        opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="moco",
                           shared=net.encoder, grad_scaler=scaler, linear_gram="off",
                           generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(6)
        grads = []
        for _ in range(3):
            x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
            L = torch.stack(net.losses(x, y))
            opt.zero_grad()
            if scaler is None:
                opt.backward(L)
                opt.step()
            else:
                opt.backward(scaler.scale(L))
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
            grads.append(torch.cat([p.grad.reshape(-1) for p in net.encoder.parameters()]))
        runs.append(grads)
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_column_blocks_match_one_block_and_the_oracle(monkeypatch):
    """On CPU ``y`` is updated in place in column blocks (64 columns here: 5 blocks, the last
    partial); the elementwise ops are the same as one block's, so ``y``, ``lambda`` and the
    updates are bit-identical, and agree with LibMTL's oracle; a non-finite step (in the
    last block) leaves the state in every block."""
    import gradops.weighting._moco as mod

    Js, Ls = _problem(T=3, P=300, steps=4, seed=7)
    bad = Js[2].clone()
    bad[1, 290] = float("inf")
    one, blocked = MoCo(rho=0.1), MoCo(rho=0.1)
    for k, (J, L) in enumerate(zip(Js + [bad], Ls + [Ls[0]])):
        monkeypatch.setattr(mod, "_CPU_BLOCK", 1 << 30)
        d1 = one.combine(J, StepContext(losses=L))
        monkeypatch.setattr(mod, "_CPU_BLOCK", 1)
        assert mod._block_width(3, 300) == 64
        y_before = blocked.y.clone() if blocked.y is not None else None
        db = blocked.combine(J, StepContext(losses=L))
        assert torch.equal(db, d1) if k < 4 else torch.isnan(db).all()
        assert torch.equal(blocked.y, one.y) and torch.equal(blocked.lam, one.lam)
    assert torch.equal(blocked.y, y_before)
    expect, y, lambd = _oracle(Js, Ls, rho=0.1)
    torch.testing.assert_close(blocked.y.double(), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocked.lam.double(), lambd, rtol=1e-5, atol=1e-6)
