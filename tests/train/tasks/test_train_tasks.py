"""Task metrics and losses against hand-computed values; the loss-level methods' formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from gradops.train.tasks.types import Binary, Classification, Regression


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
