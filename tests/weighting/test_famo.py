"""FAMO (Liu et al., NeurIPS 2023) as a loss-level method of the registry, with its extra
forward through ``opt.step(closure)``."""
import pytest
import torch

from gradops.weighting import FAMO, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


def test_declaration():
    assert get_method("FAMO") is FAMO and FAMO.needs_closure


def test_gradient_and_update_follow_the_paper():
    famo = setup_method("famo", 3, lr=0.025, gamma=0.001)
    with torch.no_grad():
        famo.w.copy_(torch.tensor([0.2, -0.1, 0.4]))
    x = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    losses = [x[0] ** 2, (x[1] - 1) ** 2 + 0.5, x[2] * 3]
    values = torch.stack([v.detach() for v in losses])
    g_terms, = torch.autograd.grad(sum(famo.terms(losses, values, StepContext())), x,
                                   retain_graph=True)
    # Alg. 1: the loss sum_t z_t log(L_t) / c, c = sum_t z_t / L_t (c held constant)
    z = torch.softmax(famo.w.detach(), 0)
    c = (z / (values + 1e-8)).sum()
    paper = sum(z[t] * torch.log(losses[t] + 1e-8) for t in range(3)) / c
    g_paper, = torch.autograd.grad(paper, x)
    torch.testing.assert_close(g_terms, g_paper)
    new = values * torch.tensor([0.5, 1.0, 2.0])
    w0 = famo.w.detach().clone()
    famo.after_step(new)
    # Alg. 1, lines 6-7: Adam on J_softmax(w)^T (log L_prev - log L_new)
    delta = torch.log(values + 1e-8) - torch.log(new + 1e-8)
    wr = w0.clone().requires_grad_(True)
    d, = torch.autograd.grad(torch.softmax(wr, 0), wr, grad_outputs=delta)
    opt = torch.optim.Adam([wr], lr=0.025, weight_decay=0.001)
    wr.grad = d
    opt.step()
    torch.testing.assert_close(famo.w.detach(), wr.detach())
    with pytest.raises(RuntimeError, match="before terms"):
        famo.after_step(new)


def test_mtloptimizer_step_needs_the_closure_and_runs_it_after_the_step():
    model = TwoTask()
    opt = optimizer(model, "famo")
    x, y = batch()
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    with pytest.raises(ValueError, match="opt.step\\(closure\\)"):
        opt.step()
    w0 = model.encoder.weight.detach().clone()
    seen = {}

    def closure():
        seen["weight"] = model.encoder.weight.detach().clone()
        seen["grad_enabled"] = torch.is_grad_enabled()
        return model.losses(x, y)

    opt.step(closure)
    assert not torch.equal(seen["weight"], w0)      # evaluated after the inner step
    assert seen["grad_enabled"] is False
    assert not torch.equal(opt.method.loss_weights(), torch.full((2,), 0.5))
    sd = opt.state_dict()
    opt2 = optimizer(TwoTask(), "famo")
    opt2.load_state_dict(sd)                        # set up from the saved num_tasks
    torch.testing.assert_close(opt2.method.loss_weights(), opt.method.loss_weights())
