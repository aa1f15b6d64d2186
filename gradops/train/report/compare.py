"""``gradops compare`` from Python: the grid of training runs
(:func:`gradops.train.runs.grid.train_grid`), then, still holding the output directory's lock,
the report (:func:`gradops.train.report.build.write_report`) with its Tables 1 and 2 printed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config.io_errors import annotate
from ..config.schema import TrainConfig
from ..runs.grid import train_grid
from .build import report_sections, write_report
from .data import load_runs

__all__ = ["run_grid"]


def run_grid(base: TrainConfig, methods: list[str], sparses: list[str], seeds: list[int],
             out_dir: str | Path, *, report: bool = True, baseline: str = "stl",
             **kw: Any) -> list[dict[str, Any]]:
    """Train every (method, sparse, seed) of the grid into ``out_dir/runs/`` and write the
    report (``report``; against the ``baseline`` method's runs, or ``"published"``).

    Args:
        base: the configuration every run starts from.
        methods: the methods' names (``"stl"``, the single-task baseline, runs once per seed).
        sparses: the sparse settings (``"off"``, ``"fraction=0.3"``...).
        seeds: the seeds.
        out_dir: the grid's directory (runs under ``out_dir/runs/``, the report beside them).
        report: write the report when the runs are done.
        baseline: the method the report compares with, or ``"published"``.
        kw: ``resume``, ``overwrite``, ``progress``, ``jobs``, ``lrs`` of
            :func:`~gradops.train.runs.grid.train_grid`.

    Returns:
        The runs' results (one dict per run).

    Raises:
        ConfigError: naming the option, for no method, sparse setting or seed, a bad ``jobs``,
            or an ``out_dir`` another ``compare`` is writing.
    """
    def finish(out: Path) -> None:
        with annotate(out):          # a failed write names the report's directory at least
            _report(out, baseline)

    return train_grid(base, methods, sparses, seeds, out_dir,
                      finish=finish if report else None, **kw)


def _report(out: Path, baseline: str = "stl") -> Path:
    """Write the report of ``out`` and print its Tables 1 and 2 and where it is."""
    path = write_report(out, baseline=baseline)
    runs, missing = load_runs(out)
    if runs:
        sections = report_sections(runs, missing, baseline=baseline)
        shown = [t for t in sections if t.startswith(("Learning rate", "Table", "Does it"))]
        print("\n" + "\n\n".join(f"## {t}\n\n{sections[t]}".rstrip() for t in shown) + "\n",
              flush=True)
    diverged = [m.name for m in missing if m.status == "diverged"]
    if diverged:
        print(f"gradops compare: {len(diverged)} run(s) diverged and are left out of every mean "
              f"(listed in report.md): {', '.join(diverged)}", flush=True)
    print(f"gradops compare: report written to {path}", flush=True)
    return path
