"""Task metrics and losses against hand-computed values; the loss-level methods' formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from gradops.train.loss_methods import DWA, FAMO, UW
from gradops.train.tasks import Binary, Classification, Regression


def test_classification_accuracy_and_macro_f1():
    t = Classification("c", 4)
    pred, y = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])
    m = {k: float(v) for k, v in t.metrics_of(pred, y).items()}
    # per class F1 = 2TP / (2TP + FP + FN): class 0: 1; class 1: 2/3; class 2: 2/3; class 3
    # occurs nowhere and is left out of the mean
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert t.directions == {"accuracy": "up", "macro_f1": "up"}
    out = torch.tensor([[2.0, 0.0, 0, 0], [0, 3.0, 0, 0]])
    assert t.predict(out).tolist() == [0, 1]
    assert float(t.loss(out, torch.tensor([0, 1]))) == pytest.approx(
        float(F.cross_entropy(out, torch.tensor([0, 1]))))


def test_binary_accuracy_and_f1():
    t = Binary("b")
    pred, y = torch.tensor([1.0, 0, 1, 1]), torch.tensor([1.0, 0, 0, 1])
    m = {k: float(v) for k, v in t.metrics_of(pred, y).items()}
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))   # TP 2, FP 1, FN 0
    none = t.metrics_of(torch.zeros(3), torch.zeros(3))
    assert float(none["accuracy"]) == 1.0 and float(none["f1"]) == 0.0
    assert t.predict(torch.tensor([[0.3], [-0.1]])).tolist() == [1.0, 0.0]
    assert t.directions == {"accuracy": "up", "f1": "up"}


def test_regression_mae_in_target_units():
    t = Regression("r", offset=9.0, scale=4.0)
    out = torch.tensor([[0.0], [1.0]])
    pred = t.predict(out)
    assert pred.tolist() == [9.0, 13.0]
    y = torch.tensor([10.0, 13.0])
    assert float(t.metrics_of(pred, y)["mae"]) == pytest.approx(0.5)
    # loss: MSE in the head's units ((y - 9) / 4 = 0.25 and 1.0)
    assert float(t.loss(out, y)) == pytest.approx((0.25 ** 2 + 0) / 2)
    assert t.directions == {"mae": "down"}


def test_nonfinite_outputs_propagate_into_the_metric():
    t = Regression("r")
    assert math.isnan(float(t.metrics_of(torch.tensor([float("nan"), 1.0]),
                                         torch.tensor([0.0, 1.0]))["mae"]))


def test_uw_terms():
    uw = UW(2, torch.device("cpu"))
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.5, -1.0]))
    L = [torch.tensor(2.0), torch.tensor(3.0)]
    terms = uw.terms(L, torch.stack(L))
    assert [float(x.detach()) for x in terms] == pytest.approx([math.exp(-0.5) * 2 + 0.5,
                                                       math.exp(1.0) * 3 - 1.0])
    sd = uw.state_dict()
    uw2 = UW(2, torch.device("cpu"))
    uw2.load_state_dict(sd)
    assert torch.equal(uw2.log_vars, uw.log_vars)


def test_dwa_weights_from_the_last_two_epochs():
    dwa = DWA(2, torch.device("cpu"), temperature=2.0)
    assert dwa.weights().tolist() == [1.0, 1.0]
    dwa.end_epoch(torch.tensor([1.0, 2.0]))
    assert dwa.weights().tolist() == [1.0, 1.0]         # still w = 1 after one epoch
    dwa.end_epoch(torch.tensor([0.5, 1.8]))
    r = torch.tensor([0.5, 0.9]) / 2.0
    expect = 2 * torch.exp(r) / torch.exp(r).sum()
    torch.testing.assert_close(dwa.weights(), expect)
    L = [torch.tensor(1.0), torch.tensor(1.0)]
    assert [float(x) for x in dwa.terms(L, torch.stack(L))] == pytest.approx(expect.tolist())


def test_famo_gradient_and_update_follow_the_paper():
    famo = FAMO(3, torch.device("cpu"), lr=0.025, gamma=0.001)
    with torch.no_grad():
        famo.w.copy_(torch.tensor([0.2, -0.1, 0.4]))
    x = torch.tensor([1.0, 2.0, 0.5], requires_grad=True)
    losses = [x[0] ** 2, (x[1] - 1) ** 2 + 0.5, x[2] * 3]
    values = torch.stack([v.detach() for v in losses])
    g_terms, = torch.autograd.grad(sum(famo.terms(losses, values)), x, retain_graph=True)
    # the paper's loss: sum_t z_t log(L_t) / c, c = sum_t z_t / L_t (c held constant)
    z = torch.softmax(famo.w.detach(), 0)
    c = (z / (values + 1e-8)).sum()
    paper = sum(z[t] * torch.log(losses[t] + 1e-8) for t in range(3)) / c
    g_paper, = torch.autograd.grad(paper, x)
    torch.testing.assert_close(g_terms, g_paper)
    new = values * torch.tensor([0.5, 1.0, 2.0])
    w0 = famo.w.detach().clone()
    famo.after_step(new)
    delta = torch.log(values + 1e-8) - torch.log(new + 1e-8)
    wr = w0.clone().requires_grad_(True)
    d, = torch.autograd.grad(torch.softmax(wr, 0), wr, grad_outputs=delta)
    opt = torch.optim.Adam([wr], lr=0.025, weight_decay=0.001)
    wr.grad = d
    opt.step()
    torch.testing.assert_close(famo.w.detach(), wr.detach())
    with pytest.raises(RuntimeError, match="before terms"):
        famo.after_step(new)
