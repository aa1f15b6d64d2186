"""UW (Kendall et al., CVPR 2018) as a loss-level method of the registry."""
import math

import pytest
import torch

from gradops.weighting import UW, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


def test_declaration():
    cls = get_method("UW")
    assert cls is UW and cls.kind == "loss" and cls.has_parameters


def test_terms_and_state():
    uw = setup_method("uw", 2)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.5, -1.0]))
    L = [torch.tensor(2.0), torch.tensor(3.0)]
    terms = uw.terms(L, torch.stack(L), StepContext())
    assert [float(x.detach()) for x in terms] == pytest.approx([math.exp(-0.5) * 2 + 0.5,
                                                               math.exp(1.0) * 3 - 1.0])
    uw2 = setup_method("uw", 2)
    uw2.load_state_dict(uw.state_dict())
    assert torch.equal(uw2.log_vars, uw.log_vars)


def test_scaled_losses_scale_the_regulariser():
    """Under AMP the losses arrive scaled by s: the terms must be s times the unscaled ones."""
    uw = setup_method("uw", 2)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -0.2]))
    L = [torch.tensor(2.0), torch.tensor(3.0)]
    s = torch.tensor(1024.0)
    plain = uw.terms(L, torch.stack(L), StepContext())
    scaled = uw.terms([x * s for x in L], torch.stack(L), StepContext(scale=s))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b.detach(), a.detach() * s)


def test_mtloptimizer_trains_the_log_variances_with_the_model():
    model = TwoTask()
    with pytest.raises(ValueError, match="num_tasks"):
        optimizer(model, "uw")
    opt = optimizer(model, "uw", num_tasks=2)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"][0] is opt.method.log_vars
    x, y = batch()
    losses = model.losses(x, y)
    opt.zero_grad()
    opt.backward(losses)
    # d/ds_t (exp(-s_t) L_t + s_t) = 1 - L_t at s = 0
    expect = 1 - torch.stack([v.detach() for v in losses])
    torch.testing.assert_close(opt.method.log_vars.grad, expect)
    opt.step()
    torch.testing.assert_close(opt.method.log_vars.detach(), -0.1 * expect)
    # resume: the state dict carries the log-variances
    model2 = TwoTask()
    opt2 = optimizer(model2, "uw", num_tasks=2)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.method.log_vars, opt.method.log_vars)


def test_nonfinite_loss_propagates():
    uw = setup_method("uw", 2)
    L = [torch.tensor(float("nan")), torch.tensor(1.0)]
    terms = uw.terms(L, torch.stack(L), StepContext())
    assert math.isnan(float(terms[0].detach())) and math.isfinite(float(terms[1].detach()))
