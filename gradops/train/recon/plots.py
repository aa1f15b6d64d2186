"""PNG plots of the Recon search, the selective task-group updates and the gradient probes
(matplotlib, Agg canvas, no pyplot: no global backend is switched)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_scores", "plot_affinity", "plot_group_counts", "plot_probes"]

_DPI = 110


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_scores(layers: Sequence[str], counts: Sequence[int], pairs_total: int, S: float,
                path: Path) -> Path:
    """Bar chart of the summed S-conflict score per layer, in network order."""
    fig = _figure(max(6.0, 0.28 * len(layers) + 2), 4.0)
    ax = fig.add_subplot()
    ax.bar(range(len(layers)), counts, color="tab:red")
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
    ax.set_ylabel(f"S-conflict score (S = {S:g})")
    ax.set_title(f"Recon search: pairs with cos < S per layer (of {pairs_total} pair-steps)")
    fig.savefig(path, dpi=_DPI)
    return path


def plot_affinity(A, names: Sequence[str], path: Path) -> Path:
    """Heat map of a ``T x T`` affinity matrix (row: source task, column: target task)."""
    import numpy as np
    A = np.asarray(A, dtype=float)
    lim = float(np.nanmax(np.abs(A))) if A.size and np.isfinite(A).any() else 1.0
    fig = _figure(1.2 + 0.55 * len(names), 1.0 + 0.5 * len(names))
    ax = fig.add_subplot()
    im = ax.imshow(A, cmap="RdBu", vmin=-lim or -1, vmax=lim or 1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("target task")
    ax.set_ylabel("source task")
    ax.set_title("proximal inter-task affinity (EMA)")
    fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=_DPI)
    return path


def plot_group_counts(counts: Sequence[int], path: Path) -> Path:
    """The number of task groups per step over training."""
    fig = _figure(6.0, 3.0)
    ax = fig.add_subplot()
    ax.plot(range(1, len(counts) + 1), counts, drawstyle="steps-post", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("groups")
    ax.set_title("selective task-group updates: number of groups")
    fig.savefig(path, dpi=_DPI)
    return path


def plot_probes(rows: Sequence[dict], path: Path) -> Path:
    """Elich et al.'s Fig. 4 layout: per measure (cosine, GMS, sign-conflict ratio) the epoch
    mean of inter-task (blue) and inter-sample (red) pairs, shaded between the 2.5 and 97.5
    percentiles."""
    measures = ("cos", "gms", "sign_conflict")
    titles = {"cos": "cosine similarity", "gms": "gradient magnitude similarity",
              "sign_conflict": "ratio of conflicting parameters"}
    fig = _figure(11.0, 3.2)
    for i, m in enumerate(measures):
        ax = fig.add_subplot(1, 3, i + 1)
        for setup, colour in (("inter_task", "tab:blue"), ("inter_sample", "tab:red")):
            rs = [r for r in rows if r["measure"] == m and r["setup"] == setup]
            if not rs:
                continue
            ep = [r["epoch"] for r in rs]
            ax.plot(ep, [r["mean"] for r in rs], color=colour, label=setup.replace("_", "-"))
            ax.fill_between(ep, [r["p2_5"] for r in rs], [r["p97_5"] for r in rs],
                            color=colour, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_title(titles[m])
        if i == 0:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=_DPI)
    return path
