"""Δm% (relative task drop against STL, lower is better) against hand-computed values."""
import math

import pytest

from gradops.train.report.delta_m import delta_m

DIRS = {"left": {"accuracy": "up", "f1": "up"}, "sum": {"mae": "down"}}
STL = {"left": {"accuracy": 0.80, "f1": 0.50}, "sum": {"mae": 2.0}}


def test_hand_computed_two_tasks_both_directions():
    # left: accuracy 0.72 is 10% below STL (a drop: +10), f1 0.55 is 10% above (a gain: -10)
    #       -> task mean 0; sum: MAE 2.5 is 25% above STL (worse: +25) -> Δm = (0 + 25) / 2
    method = {"left": {"accuracy": 0.72, "f1": 0.55}, "sum": {"mae": 2.5}}
    assert delta_m(method, STL, DIRS) == pytest.approx(12.5, abs=1e-12)
    # better than STL everywhere: accuracy +5% (-5), f1 +20% (-20) -> -12.5; MAE -10% (-10)
    better = {"left": {"accuracy": 0.84, "f1": 0.60}, "sum": {"mae": 1.8}}
    assert delta_m(better, STL, DIRS) == pytest.approx((-12.5 - 10) / 2, abs=1e-12)


def test_stl_against_itself_is_zero_and_tasks_weigh_equally():
    assert delta_m(STL, STL, DIRS) == 0.0
    # one task with one metric 20% worse: Δm = 20 / 2 tasks, whatever the other task's metric count
    method = {"left": {"accuracy": 0.80, "f1": 0.50}, "sum": {"mae": 2.4}}
    assert delta_m(method, STL, DIRS) == pytest.approx(10.0)


def test_negative_stl_value_uses_the_formula_as_written():
    # (-1)^u (M - S) / S with S < 0: lower-is-better, M = -1 against S = -2 -> (1) / (-2) = -50
    assert delta_m({"t": {"m": -1.0}}, {"t": {"m": -2.0}}, {"t": {"m": "down"}}) == -50.0


def test_non_finite_values_propagate():
    method = {"left": {"accuracy": math.nan, "f1": 0.5}, "sum": {"mae": 2.0}}
    assert math.isnan(delta_m(method, STL, DIRS))
    inf = {"left": {"accuracy": 0.8, "f1": 0.5}, "sum": {"mae": math.inf}}
    assert delta_m(inf, STL, DIRS) == math.inf


@pytest.mark.parametrize("method, stl, dirs, match", [
    ({"left": STL["left"]}, STL, DIRS,
     r"method_metrics does not match directions: missing \['sum'\]"),
    (STL, {"sum": STL["sum"]}, DIRS, r"stl_metrics does not match directions: missing \['left'\]"),
    ({**STL, "x": {"a": 1.0}}, STL, DIRS, r"method_metrics .*not in directions: \['x'\]"),
    ({"left": {"accuracy": 0.8}, "sum": {"mae": 2.0}}, STL, DIRS,
     r"method_metrics\['left'\] does not match directions: missing \['f1'\]"),
    (STL, {"left": {"accuracy": 0.0, "f1": 0.5}, "sum": {"mae": 2.0}}, DIRS,
     r"stl_metrics\['left'\]\['accuracy'\] is 0"),
    (STL, STL, {"left": {"accuracy": "higher", "f1": "up"}, "sum": {"mae": "down"}},
     r"directions\['left'\]\['accuracy'\] must be one of"),
    (STL, STL, {}, "directions holds no task"),
    ({"left": {}}, {"left": {}}, {"left": {}}, r"directions\['left'\] holds no metric"),
])
def test_value_errors(method, stl, dirs, match):
    with pytest.raises(ValueError, match=match):
        delta_m(method, stl, dirs)


def test_type_errors():
    with pytest.raises(TypeError, match="method_metrics must be a mapping"):
        delta_m([0.8], STL, DIRS)
    with pytest.raises(TypeError, match=r"method_metrics\['sum'\]\['mae'\] must be a real number"):
        delta_m({"left": STL["left"], "sum": {"mae": "2.0"}}, STL, DIRS)
    with pytest.raises(TypeError, match="real number, got bool"):
        delta_m({"left": STL["left"], "sum": {"mae": True}}, STL, DIRS)
