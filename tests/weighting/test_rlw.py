"""RLW (Lin et al., TMLR 2022): random loss weights, checked against LibMTL's formula."""
import pytest
import torch

from gradops.weighting import RLW, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


def test_declaration():
    assert get_method("RLW") is RLW and RLW.kind == "loss" and RLW.random
    with pytest.raises(ValueError, match="'distribution' must be one of"):
        RLW(distribution="dirichlet")


def test_weights_are_libmtls_softmax_of_normal_draws():
    """LibMTL's RLW.backward: ``softmax(torch.randn(task_num))``, then ``sum(losses * w)``."""
    rlw = setup_method("rlw", 3)
    L = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    terms = rlw.terms(L, torch.stack(L), StepContext(generator=torch.Generator().manual_seed(7)))
    expect = torch.softmax(torch.randn(3, generator=torch.Generator().manual_seed(7)), dim=-1)
    torch.testing.assert_close(rlw.loss_weights(), expect)
    torch.testing.assert_close(torch.stack(terms), expect * torch.stack(L))
    assert float(expect.sum()) == pytest.approx(1.0)


def test_pinned_values_and_the_uniform_variant():
    g = torch.Generator().manual_seed(0)
    w = setup_method("rlw", 3).draw(g, torch.device("cpu"))
    torch.testing.assert_close(w, torch.tensor([0.8446, 0.1349, 0.0205]), atol=1e-4, rtol=0)
    u = setup_method("rlw", 3, distribution="uniform")
    wu = u.draw(torch.Generator().manual_seed(0), torch.device("cpu"))
    expect = torch.softmax(torch.rand(3, generator=torch.Generator().manual_seed(0)), dim=0)
    torch.testing.assert_close(wu, expect)


def test_mtloptimizer_step_is_the_weighted_sum_with_fresh_weights_each_step():
    model = TwoTask()
    opt = optimizer(model, "rlw", generator=torch.Generator().manual_seed(3))
    x, y = batch()
    draws = torch.Generator().manual_seed(3)
    seen = []
    for _ in range(2):
        losses = model.losses(x, y)
        w = torch.softmax(torch.randn(2, generator=draws), dim=0)
        ref = torch.autograd.grad(sum(w[t] * losses[t] for t in range(2)),
                                  model.encoder.weight, retain_graph=True)[0]
        opt.zero_grad()
        opt.backward(losses)
        torch.testing.assert_close(model.encoder.weight.grad, ref)
        seen.append(opt.method.loss_weights().clone())
        opt.step()
    assert not torch.equal(seen[0], seen[1])


def test_nonfinite_loss_propagates():
    rlw = setup_method("rlw", 2)
    L = [torch.tensor(float("inf")), torch.tensor(1.0)]
    terms = rlw.terms(L, torch.stack(L), StepContext(generator=torch.Generator().manual_seed(0)))
    assert not torch.isfinite(terms[0]) and torch.isfinite(terms[1])
