"""The PNG plots of the ``gradops compare`` report (matplotlib, Agg canvas, no pyplot).

Importing this module imports matplotlib; :mod:`gradops.train.report.build` imports it only when it
draws. Figures are built on :class:`matplotlib.figure.Figure` with an Agg canvas, so no global
backend is switched and no window opens. Each function returns the path(s) it wrote, or None when
no run holds the data it plots. Colours follow the method, line styles the sparse setting
(solid: off, dashed/dotted: with ST), as in the ST paper's Fig. 4.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .data import Run, display_name, method_key, sparse_key

__all__ = ["plot_cosine_hist", "plot_incidence_average", "plot_incidence_per_epoch",
           "plot_layer_conflicts", "plot_task_metrics"]

_STYLES = ("-", "--", ":", "-.")
_MAX_PANELS = 12
_DPI = 110


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def _groups(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    out: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (method_key(r.method), sparse_key(r.sparse), r.seed)):
        out.setdefault((run.method, run.sparse), []).append(run)
    return out


def _colours(runs: Sequence[Run]) -> dict[str, object]:
    from matplotlib import colormaps

    methods = sorted({r.method for r in runs if r.method != "stl"}, key=method_key)
    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {"stl": "black", **{m: cmap(i % cmap.N) for i, m in enumerate(methods)}}


def _styles(runs: Sequence[Run]) -> dict[str, str]:
    sparses = sorted({r.sparse for r in runs}, key=sparse_key)
    return {s: _STYLES[i % len(_STYLES)] if "off" in sparses else _STYLES[(i + 1) % len(_STYLES)]
            for i, s in enumerate(sparses)}


def _label(method: str, sparse: str) -> str:
    return display_name(method) + ("" if sparse == "off" else f" w/ ST ({sparse})")


def _mean_std_by_epoch(series: Sequence[dict[int, float]]) -> tuple[list[int], list[float],
                                                                     list[float]]:
    epochs = sorted({e for s in series for e in s})
    means, stds = [], []
    for e in epochs:
        xs = [s[e] for s in series if e in s]
        m = sum(xs) / len(xs)
        means.append(m)
        stds.append(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1
                    else 0.0)
    return epochs, means, stds


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
    ax.set_xlabel("epoch")
    if epochs and len(set(epochs)) <= 10:
        ax.set_xticks(sorted(set(epochs)))
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))


def _legend_below(fig: Figure, handles: Sequence, labels: Sequence[str]) -> None:
    """One legend for the figure, below its panels, in as many columns as fit the width."""
    if handles:
        ncols = max(1, min(len(handles), int(fig.get_figwidth() / 2.8)))
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small")


def plot_incidence_per_epoch(runs: Sequence[Run], path: Path) -> Path | None:
    """Incidence of gradient conflict (%) per epoch (train lines' ``gc``), one line per (method,
    sparse) with the mean over seeds and a ±1 std band (ST paper, Fig. 4)."""
    colours, styles = _colours(runs), _styles(runs)
    fig = _figure(9.0, 5.2)
    ax = fig.add_subplot()
    all_epochs: list[int] = []
    drawn = False
    for (method, sparse), group in _groups(runs).items():
        series = [{e.epoch: e.gc for e in r.log if e.split == "train" and e.gc is not None}
                  for r in group]
        series = [s for s in series if s]
        if not series:
            continue
        epochs, means, stds = _mean_std_by_epoch(series)
        y = [100 * m for m in means]
        ax.plot(epochs, y, styles[sparse], color=colours[method],
                marker="o" if len(epochs) <= 10 else None, markersize=3,
                label=_label(method, sparse))
        if len(series) > 1:
            ax.fill_between(epochs, [100 * (m - s) for m, s in zip(means, stds)],
                            [100 * (m + s) for m, s in zip(means, stds)], color=colours[method],
                            alpha=0.12, linewidth=0)
        all_epochs += epochs
        drawn = True
    if not drawn:
        return None
    ax.set_ylabel("incidence of gradient conflict (%)")
    fig.suptitle("Incidence of gradient conflict per epoch (mean over seeds, band: ±1 std)")
    _epoch_axis(ax, all_epochs)
    ax.grid(alpha=0.3)
    _legend_below(fig, *ax.get_legend_handles_labels())
    return _save(fig, path)


def plot_incidence_average(runs: Sequence[Run], path: Path) -> Path | None:
    """Average incidence (%) over all epochs and over the last 50% of epochs as grouped bars, one
    group per method and one bar per sparse setting, error bars ±1 std (ST paper, Fig. 1)."""
    groups = {k: g for k, g in _groups(runs).items()
              if any(r.gc_all is not None or r.gc_last50 is not None for r in g)}
    if not groups:
        return None
    methods = sorted({m for m, _ in groups}, key=method_key)
    sparses = sorted({s for _, s in groups}, key=sparse_key)
    colours = _colours(runs)
    width = 0.8 / len(sparses)
    fig = _figure(max(7.0, 1.1 * len(methods) * 2 + 2), 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, field, title in ((axes[0], "gc_all", "all epochs"),
                             (axes[1], "gc_last50", "last 50% of epochs")):
        for j, sparse in enumerate(sparses):
            xs, ys, errs, cols = [], [], [], []
            for i, method in enumerate(methods):
                vals = [getattr(r, field) for r in groups.get((method, sparse), [])]
                vals = [100 * v for v in vals if v is not None]
                if not vals:
                    continue
                m = sum(vals) / len(vals)
                s = (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
                     if len(vals) > 1 else 0.0)
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(m)
                errs.append(s)
                cols.append(colours[method])
            ax.bar(xs, ys, width * 0.95, yerr=errs, color=cols, capsize=2,
                   hatch=None if sparse == "off" else "//", edgecolor="black", linewidth=0.5,
                   alpha=1.0 if sparse == "off" else 0.6,
                   label="without ST" if sparse == "off" else f"w/ ST ({sparse})")
        ax.set_xticks(range(len(methods)), [display_name(m) for m in methods], rotation=30,
                      ha="right")
        ax.set_title(f"Average incidence, {title}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("incidence of gradient conflict (%)")
    from matplotlib.patches import Patch

    axes[1].legend(handles=[Patch(facecolor="lightgrey" if s == "off" else "white",
                                  edgecolor="black", hatch=None if s == "off" else "//",
                                  label="without ST" if s == "off" else f"w/ ST ({s})")
                            for s in sparses], fontsize="small")
    return _save(fig, path)


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def plot_cosine_hist(runs: Sequence[Run], path: Path) -> Path | None:
    """Distribution of pairwise task-gradient cosines per method (``result.json``'s
    ``cosine_hist`` summed over seeds, shown as the fraction of pairs per bin), one panel per
    method with one line per sparse setting; the dotted vertical line marks cos = 0."""
    groups = {k: [r for r in g if r.cosine_hist is not None] for k, g in _groups(runs).items()}
    groups = {k: g for k, g in groups.items() if g}
    if not groups:
        return None
    methods = sorted({m for m, _ in groups}, key=method_key)
    styles = _styles(runs)
    rows, cols = _grid(len(methods))
    fig = _figure(3.4 * cols, 2.8 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.set_visible(False)
    for ax, method in zip(axes.flat, methods):
        for (m, sparse), group in groups.items():
            if m != method:
                continue
            edges = group[0].cosine_hist["edges"]
            counts = [0.0] * (len(edges) - 1)
            for r in group:
                if r.cosine_hist["edges"] != edges:
                    raise ValueError(f"run {r.name!r}: cosine_hist edges differ from "
                                     f"{group[0].name!r}'s within one (method, sparse)")
                counts = [c + x for c, x in zip(counts, r.cosine_hist["counts"])]
            total = sum(counts)
            frac = [c / total if total else math.nan for c in counts]
            ax.stairs(frac, edges, linestyle=styles[sparse], linewidth=1.4,
                      label="without ST" if sparse == "off" else f"w/ ST ({sparse})")
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(display_name(method))
        ax.set_xlabel("cosine of task-gradient pair")
        ax.set_ylabel("fraction of pairs")
    fig.suptitle("Distribution of pairwise gradient cosines (all steps, all seeds; "
                 "cos < 0: conflict)")
    handles = {}
    for ax in axes.flat[:len(methods)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    _legend_below(fig, list(handles.values()), list(handles))
    return _save(fig, path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_layer_conflicts(runs: Sequence[Run], out_dir: Path) -> dict[str, Path]:
    """Per method, ``layer_conflicts_<method>.png``: heat maps of per-layer conflict counts
    (layers x epochs, from ``conflicts.csv``) of the first seed, one panel per sparse setting,
    on one colour scale per method."""
    by_method: dict[str, list[Run]] = {}
    for (method, _), group in _groups(runs).items():
        first = next((r for r in group if r.conflicts is not None and r.conflicts.layers
                      and any(not math.isnan(c) for row in r.conflicts.counts for c in row)),
                     None)
        if first is not None:
            by_method.setdefault(method, []).append(first)
    written = {}
    for method, firsts in by_method.items():
        n_layers = max(len(r.conflicts.layers) for r in firsts)
        vmax = max((c for r in firsts for row in r.conflicts.counts for c in row
                    if not math.isnan(c)), default=1.0) or 1.0
        fig = _figure(max(4.5, 3.8 * len(firsts)) + 1.0,
                      min(14.0, max(3.0, 0.28 * n_layers + 1.6)))
        axes = fig.subplots(1, len(firsts), squeeze=False)[0]
        image = None
        for ax, run in zip(axes, firsts):
            c = run.conflicts
            grid = [[row[j] for row in c.counts] for j in range(len(c.layers))]  # layers x epochs
            image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                              vmin=0, vmax=vmax,
                              extent=(c.epochs[0] - 0.5, c.epochs[-1] + 0.5,
                                      len(c.layers) - 0.5, -0.5))
            step = max(1, math.ceil(len(c.layers) / 40))
            ax.set_yticks(range(0, len(c.layers), step), c.layers[::step], fontsize="x-small")
            _epoch_axis(ax, c.epochs)
            ax.set_title(f"{'without ST' if run.sparse == 'off' else 'w/ ST (' + run.sparse + ')'}"
                         f", seed {run.seed}", fontsize="medium")
        axes[0].set_ylabel("layer")
        fig.colorbar(image, ax=list(axes), label="conflicting task pairs (cos < 0)")
        fig.suptitle(f"Per-layer gradient conflicts, {display_name(method)}: task pairs with a "
                     "negative cosine on the layer, summed over the epoch's steps",
                     fontsize="medium")
        written[method] = _save(fig, out_dir / f"layer_conflicts_{_safe(method)}.png")
    return written


def plot_task_metrics(runs: Sequence[Run], path: Path) -> tuple[Path, str] | None:
    """Task metrics per epoch on the val split (the test split where no run logs val), one panel
    per (task, metric), or per metric averaged over the tasks when there are more than 12, one
    line per (method, sparse) with the mean over seeds. Returns (path, split)."""
    splits = {e.split for r in runs for e in r.log}
    split = "val" if "val" in splits else "test" if "test" in splits else None
    if split is None:
        return None
    pairs = list(dict.fromkeys((t, m) for r in runs for e in r.log if e.split == split
                               for t, ms in e.metrics.items() for m in ms))
    if not pairs:
        return None
    averaged = len(pairs) > _MAX_PANELS
    panels = list(dict.fromkeys(m for _, m in pairs)) if averaged else pairs
    dirs = {(t, m): d for r in runs for t, ms in r.directions.items() for m, d in ms.items()}
    colours, styles = _colours(runs), _styles(runs)
    rows, cols = _grid(len(panels))
    fig = _figure(max(7.0, 3.6 * cols), 2.9 * rows + 1.0)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)

    def value(line, panel):
        if not averaged:
            t, m = panel
            return line.metrics.get(t, {}).get(m)
        vals = [ms[panel] for ms in line.metrics.values() if panel in ms]
        return sum(vals) / len(vals) if vals else None

    all_epochs: list[int] = []
    for ax, panel in zip(axes.flat, panels):
        for (method, sparse), group in _groups(runs).items():
            series = []
            for r in group:
                s = {e.epoch: value(e, panel) for e in r.log if e.split == split}
                series.append({k: v for k, v in s.items() if v is not None})
            series = [s for s in series if s]
            if not series:
                continue
            epochs, means, _ = _mean_std_by_epoch(series)
            all_epochs += epochs
            ax.plot(epochs, means, styles[sparse], color=colours[method],
                    marker="o" if len(epochs) <= 10 else None, markersize=3,
                    label=_label(method, sparse))
        if averaged:
            ds = {d for (t, m), d in dirs.items() if m == panel}
            title = f"{panel} (mean of {sum(1 for _, m in pairs if m == panel)} tasks)"
        else:
            ds = {dirs.get(panel)}
            title = f"{panel[0]}: {panel[1]}"
        arrow = {"up": " ↑", "down": " ↓"}.get(ds.pop(), "") if len(ds) == 1 else ""
        ax.set_title(title + arrow, fontsize="medium")
        _epoch_axis(ax, all_epochs)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Task metrics per epoch, {split} split (mean over seeds; ↑ higher is better, "
                 f"↓ lower is better)")
    handles = {}
    for ax in axes.flat[:len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    _legend_below(fig, list(handles.values()), list(handles))
    return _save(fig, path), split
