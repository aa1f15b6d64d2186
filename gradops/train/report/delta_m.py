"""Δm%: a method's average relative drop in task performance against single-task learning.

Maninis et al. ("Attentive Single-Tasking of Multiple Tasks", CVPR 2019) define the multi-task
performance of a method as its average relative difference to the single-task (STL) baselines.
This module uses the sign of the Sparse Training paper (Zhang et al., "Proactive Gradient Conflict
Mitigation in Multi-Task Learning: A Sparse Training Perspective", §4.1, "relative task drop") and
of Nash-MTL (Navon et al., 2022) and FAMO (Liu et al., 2023)::

    Δm% = mean_t  mean_{k in metrics of t}  (-1)^{u_k} (M_tk - S_tk) / S_tk * 100

with ``M`` the method's value, ``S`` the STL value and ``u_k = 1`` when higher is better for metric
``k`` ("up"), ``u_k = 0`` when lower is better ("down"). **Lower is better**: a positive Δm% is a
drop against STL, a negative one a gain (Nash-MTL reports -4.04 on NYUv2, Joint Train 5.59).
LibMTL and Recon print the opposite sign ("improvement", higher is better); LibMTL also measures
against epoch 0 instead of STL. Here the baseline is always STL.

Metrics are first averaged within a task and then over tasks, so a task with many metrics counts
as much as a task with one (the per-task mean of the formula above).
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = ["DIRECTIONS", "delta_m"]

#: The two metric directions: "up" = higher is better, "down" = lower is better.
DIRECTIONS = ("up", "down")


def _check_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"delta_m: {what} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_mapping(value: object, name: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise TypeError(f"delta_m: {name} must be a mapping task -> {{metric: value}}, "
                        f"got {type(value).__name__}")
    return value


def _same_keys(expected: Mapping, got: Mapping, name: str, where: str) -> None:
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"not in directions: {extra}")
        raise ValueError(f"delta_m: {name}{where} does not match directions: {'; '.join(parts)}")


def delta_m(method_metrics: Mapping[str, Mapping[str, float]],
            stl_metrics: Mapping[str, Mapping[str, float]],
            directions: Mapping[str, Mapping[str, str]]) -> float:
    """Δm% of a method against STL (lower is better; see the module docstring for the formula).

    Args:
        method_metrics: ``{task: {metric: value}}``, the method's (final test) metrics.
        stl_metrics: the same structure for the single-task baselines (e.g. their mean over seeds).
        directions: ``{task: {metric: "up" | "down"}}``, "up" when higher is better. It names the
            tasks and metrics that enter Δm; both metric mappings must hold exactly these.

    Returns:
        Δm in percent, a float. Non-finite values (NaN, inf) propagate into the result.

    Raises:
        ValueError: no task, a task without metrics, a direction other than "up"/"down", a task or
            metric missing from (or extra in) ``method_metrics`` / ``stl_metrics``, or an STL value
            of 0 (the relative difference is undefined).
        TypeError: an argument that is not a mapping, or a value that is not a real number.
    """
    _check_mapping(directions, "directions")
    _check_mapping(method_metrics, "method_metrics")
    _check_mapping(stl_metrics, "stl_metrics")
    if not directions:
        raise ValueError("delta_m: directions holds no task")
    _same_keys(directions, method_metrics, "method_metrics", "")
    _same_keys(directions, stl_metrics, "stl_metrics", "")
    per_task = []
    for task, dirs in directions.items():
        _check_mapping(dirs, f"directions[{task!r}]")
        if not dirs:
            raise ValueError(f"delta_m: directions[{task!r}] holds no metric")
        m_task = _check_mapping(method_metrics[task], f"method_metrics[{task!r}]")
        s_task = _check_mapping(stl_metrics[task], f"stl_metrics[{task!r}]")
        _same_keys(dirs, m_task, "method_metrics", f"[{task!r}]")
        _same_keys(dirs, s_task, "stl_metrics", f"[{task!r}]")
        terms = []
        for metric, direction in dirs.items():
            if direction not in DIRECTIONS:
                raise ValueError(f"delta_m: directions[{task!r}][{metric!r}] must be one of "
                                 f"{DIRECTIONS}, got {direction!r}")
            m = _check_number(m_task[metric], f"method_metrics[{task!r}][{metric!r}]")
            s = _check_number(s_task[metric], f"stl_metrics[{task!r}][{metric!r}]")
            if s == 0.0:
                raise ValueError(f"delta_m: stl_metrics[{task!r}][{metric!r}] is 0: the relative "
                                 "difference to STL is undefined")
            sign = -1.0 if direction == "up" else 1.0
            terms.append(sign * (m - s) / s * 100.0)
        per_task.append(sum(terms) / len(terms))
    return sum(per_task) / len(per_task)
