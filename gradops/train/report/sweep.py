"""The fraction sweep of the ``gradops compare`` report: incidence of gradient conflict and Δm%
against the trainable fraction of the encoder, one line per method (the ST paper's Fig. 5(b),
Zhang et al., "Proactive Gradient Conflict Mitigation in Multi-Task Learning: A Sparse Training
Perspective", §4).

A grid such as ``--sparse off,0.1,0.3,0.45,0.6,0.8`` gives each method several trainable
fractions; the x axis is each run's measured trainable fraction (``sparse_fraction`` in
``result.json``: the ``k`` nearest the requested fraction), 1.0 for ``off``. With selection rules
(``random:0.6``, ...) each rule gets its own line style; ``off`` joins every rule's line. The
plot is drawn when some (method, rule) has at least :data:`MIN_FRACTIONS` distinct fractions.
Importing this module imports matplotlib (the report imports it only when it draws).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config.schema import parse_sparse_rule
from ..config.errors import ConfigError
from .data import Run, display_name, method_key

__all__ = ["MIN_FRACTIONS", "sweep_points", "plot_fraction_sweep"]

MIN_FRACTIONS = 3
_STYLES = {"psn": "-", "random": "--", "global": ":", "reverse": "-."}


def _fraction(run: Run) -> float | None:
    """The run's trainable fraction of the encoder (1.0 without ST), from its ``result.json``
    (the requested fraction when that file does not hold it; None for an unreadable setting)."""
    try:
        rule, kind, value = parse_sparse_rule(run.sparse)
    except ConfigError:
        return None
    if kind == "off":
        return 1.0
    try:
        f = json.loads((run.path / "result.json").read_text()).get("sparse_fraction")
    except (OSError, ValueError, AttributeError):
        f = None
    if isinstance(f, (int, float)) and math.isfinite(f):
        return float(f)
    return float(value) if kind == "fraction" else None


def _rule(sparse: str) -> str | None:
    try:
        return parse_sparse_rule(sparse)[0]
    except ConfigError:
        return None


def sweep_points(runs: Sequence[Run], delta_m_of: Callable[[Run], float | None], *,
                 baseline: str = "stl"
                 ) -> dict[tuple[str, str], list[tuple[float, list[float], list[float]]]]:
    """``(method, rule) -> [(fraction, incidences %, Δm% values), ...]`` sorted by fraction, one
    point per sparse setting (its seeds' values), for the (method, rule) pairs with at least
    :data:`MIN_FRACTIONS` distinct fractions. ``off`` runs join every rule of their method."""
    by_key: dict[tuple[str, str | None], dict[float, tuple[list[float], list[float]]]] = {}
    for run in runs:
        if run.method == baseline:
            continue
        f = _fraction(run)
        if f is None:
            continue
        cell = by_key.setdefault((run.method, _rule(run.sparse)), {}).setdefault(f, ([], []))
        if run.gc_all is not None:
            cell[0].append(100.0 * run.gc_all)
        dm = delta_m_of(run)
        if dm is not None:
            cell[1].append(dm)
    out = {}
    for (method, rule), points in by_key.items():
        if rule is None:
            continue
        merged = dict(points)
        for f, (gc, dm) in by_key.get((method, None), {}).items():   # "off": 1.0
            merged.setdefault(f, ([], []))
            merged[f] = (merged[f][0] + gc, merged[f][1] + dm)
        if len(merged) >= MIN_FRACTIONS:
            out[(method, rule)] = [(f, *merged[f]) for f in sorted(merged)]
    return dict(sorted(out.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1])))


def _mean_std(xs: list[float]) -> tuple[float, float] | None:
    if not xs:
        return None
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def plot_fraction_sweep(runs: Sequence[Run], delta_m_of: Callable[[Run], float | None],
                        path: Path, *, baseline: str = "stl") -> Path | None:
    """Two panels against the trainable fraction: the average incidence over all epochs (%) and
    Δm% (mean ± std over seeds); None when no (method, rule) has enough fractions."""
    points = sweep_points(runs, delta_m_of, baseline=baseline)
    if not points:
        return None
    from matplotlib import colormaps

    from .plots import _figure, _save   # matplotlib: optional
    methods = sorted({m for m, _ in points}, key=method_key)
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    colour = {m: cmap(i % cmap.N) for i, m in enumerate(methods)}
    rules = sorted({r for _, r in points})
    fig = _figure(10.0, 4.2)
    axes = fig.subplots(1, 2)
    for ax, idx, ylabel in ((axes[0], 1, "incidence of gradient conflict, all epochs (%)"),
                            (axes[1], 2, "Δm% (lower is better)")):
        for (method, rule), pts in points.items():
            xs, ys, es = [], [], []
            for p in pts:
                st = _mean_std(p[idx])
                if st is not None:
                    xs.append(p[0])
                    ys.append(st[0])
                    es.append(st[1])
            if not xs:
                continue
            label = display_name(method) + (f" ({rule})" if len(rules) > 1 else "")
            ax.errorbar(xs, ys, yerr=es, color=colour[method], linestyle=_STYLES.get(rule, "-"),
                        marker="o", markersize=3, capsize=2, label=label)
        ax.set_xlabel("trainable fraction of the encoder (1.0: without ST)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.0, color="black", linewidth=0.6)
    axes[0].set_title("Incidence vs trainable fraction")
    axes[1].set_title("Δm% vs trainable fraction")
    axes[1].legend(fontsize="small")
    return _save(fig, path)
