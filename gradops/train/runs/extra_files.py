"""The run directory's files of Recon branching (``recon.json``), selective task-group updates
(``selective_groups.csv``, ``selective_affinity.csv`` and their plots) and the gradient probes
(``probes.csv``, ``probes.png``), rewritten after every epoch (see docs/recon.md). The plots need
matplotlib (``pip install gradops[train]``), imported only when a run writes one.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from ..config.atomic import atomic_write_text
from ..engine.probes import PROBE_COLUMNS, GradientProbe
from ..engine.selective import SelectiveGroups
from ..engine.trainer import Trainer

__all__ = ["extra_files", "write_extra_files", "write_probes", "write_selective_outputs"]


def extra_files(tr: Trainer) -> tuple[str, ...]:
    """The names of the files :func:`write_extra_files` writes for this trainer."""
    names: tuple[str, ...] = ()
    if tr.branch_report is not None:
        names += ("recon.json",)
    if tr.selective is not None:
        names += ("selective_groups.csv", "selective_affinity.csv", "selective_affinity.png",
                  "selective_groups.png")
    if tr.probe is not None:
        names += ("probes.csv", "probes.png")
    return names


def write_extra_files(tr: Trainer, out: Path) -> None:
    """``recon.json`` (the branching report), the selective updates' files and the probes'
    files, as far as the run uses them."""
    out = Path(out)
    if tr.branch_report is not None:
        atomic_write_text(out / "recon.json", json.dumps(tr.branch_report, indent=1) + "\n")
    if tr.selective is not None:
        write_selective_outputs(tr.selective, [t.name for t in tr.tasks], out)
    if tr.probe is not None:
        write_probes(tr.probe, out)


def write_probes(probe: GradientProbe, out_dir: Path) -> None:
    """``probes.csv`` (:data:`~gradops.train.engine.probes.PROBE_COLUMNS`) and ``probes.png``
    (Elich et al.'s Fig. 4)."""
    out = Path(out_dir)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=PROBE_COLUMNS)
    w.writeheader()
    w.writerows(probe.rows)
    atomic_write_text(out / "probes.csv", buf.getvalue())
    from ..recon.plots import plot_probes   # matplotlib: optional
    plot_probes(probe.rows, out / "probes.png")


def write_selective_outputs(sel: SelectiveGroups, names: Sequence[str], out_dir: Path) -> None:
    """``selective_groups.csv`` (step, number of groups, the groups as ``a+b|c``),
    ``selective_affinity.csv`` and the plots ``selective_affinity.png`` and
    ``selective_groups.png``."""
    out = Path(out_dir)
    lines = ["step,n_groups,groups"]
    for i, gs in enumerate(sel.history, 1):
        lines.append(f"{i},{len(gs)}," + "|".join("+".join(names[t] for t in g) for g in gs))
    atomic_write_text(out / "selective_groups.csv", "\n".join(lines) + "\n")
    A = sel.affinity.cpu().tolist()
    rows = ["source," + ",".join(names)] + [names[s] + "," + ",".join(repr(v) for v in row)
                                             for s, row in enumerate(A)]
    atomic_write_text(out / "selective_affinity.csv", "\n".join(rows) + "\n")
    from ..recon.plots import plot_affinity, plot_group_counts   # matplotlib: optional
    plot_affinity(A, names, out / "selective_affinity.png")
    plot_group_counts([len(gs) for gs in sel.history], out / "selective_groups.png")
