"""The report of ``gradops compare``: ``summary.csv``, ``report.md`` and PNG plots.

It reproduces the form of the Sparse Training paper's comparison (Zhang et al., "Proactive
Gradient Conflict Mitigation in Multi-Task Learning: A Sparse Training Perspective", §4):

- Table 1: the average incidence of gradient conflict (fraction of task pairs whose gradients on
  the shared parameters have a negative cosine, Yu et al.'s conflict) over all epochs and over the
  last 50% of epochs, per method, without and with sparse training (ST), and ST's reduction;
- Table 2: per-task test metrics and Δm% against single-task learning (STL), see
  :mod:`gradops.train.report.delta_m` for the sign (relative task drop, lower is better);
- plots: incidence per epoch per method (the paper's Fig. 4, with/without ST solid/dashed), the
  averages as bars (its Fig. 1), the distribution of pairwise cosines (as in Recon, Shi et al.,
  Fig. 1), per-layer conflict counts as heat maps (Recon's S-conflict score per layer and epoch),
  and the task metrics over epochs.

Every number is a mean over the seeds of a (method, sparse) group, ± the sample standard deviation
(n - 1) when there are at least two seeds. Δm% compares each run's final test metrics with the STL
baseline: the runs of method ``baseline`` (default ``"stl"``) with sparse "off" when there are any
(else those of the first other sparse setting, which the report then names), averaged over their
seeds. Runs without a usable ``result.json`` are listed as missing in ``report.md`` and in
``summary.csv`` (``status`` "missing"); runs that diverged (:mod:`gradops.train.engine.divergence`)
are listed as diverged (``status`` "diverged"). Both are *failed* runs: left out of every mean and
counted in each table row's "seeds (failed)" cell. With several learning rates in the grid
(``compare --lr``), each (method, sparse) is reported at the rate chosen on validation Δm%
(:mod:`gradops.train.report.lr`). The "Does it reproduce?" section checks the paper's claims on
paired seeds (:mod:`gradops.train.report.verdicts`).
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from ..config.atomic import atomic_write_text
from .baseline import Baseline
from .data import MissingRun, Run, display_name, load_runs, method_key, sparse_key
from .delta_m import delta_m
from .epochs import format_epoch_table
from .lr import format_lr_table, select_lr
from .published_stl import published_baseline
from .sweep import MIN_FRACTIONS, plot_fraction_sweep
from .verdicts import format_reproduction

__all__ = ["Baseline", "format_table_1", "format_table_2", "report_sections", "stl_baseline",
           "summary_rows", "write_report"]

SUMMARY_COLUMNS = ("method", "sparse", "seed", "gc_all", "gc_last50", "delta_m", "time_s")
_ARROW = {"up": "↑", "down": "↓"}
DASH = "—"


# --- groups and statistics ---------------------------------------------------------------------
def _groups(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """(method, sparse) -> its runs sorted by seed, in the paper's method order, "off" first."""
    out: dict[tuple[str, str], list[Run]] = {}
    for run in sorted(runs, key=lambda r: (method_key(r.method), sparse_key(r.sparse), r.seed)):
        out.setdefault((run.method, run.sparse), []).append(run)
    return out


def _mean_std(values: Sequence[float | None]) -> tuple[float, float | None] | None:
    """Mean and sample std (n - 1; None for one value) of the non-None values; None if none."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _fmt(stat: tuple[float, float | None] | None, digits: int, scale: float = 1.0) -> str:
    if stat is None:
        return DASH
    mean, std = stat
    text = f"{mean * scale:.{digits}f}"
    if text.startswith("-") and float(text) == 0.0:
        text = text[1:]  # a rounding residue such as -1e-17 prints as 0.00, not -0.00
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


# --- the STL baseline and Δm -------------------------------------------------------------------
def stl_baseline(runs: Sequence[Run], baseline: str = "stl") -> Baseline | None:
    """The runs of method ``baseline`` with sparse "off" (else the first other sparse setting),
    their metrics averaged over seeds; None when no run of that method exists.

    Raises:
        ValueError: the chosen runs disagree on their tasks, metrics or metric directions.
    """
    if baseline == "published":          # the published STL table
        return published_baseline(runs)
    chosen = [r for r in runs if r.method == baseline]
    if not chosen:
        return None
    sparse = min({r.sparse for r in chosen}, key=sparse_key)
    chosen = sorted((r for r in chosen if r.sparse == sparse), key=lambda r: r.seed)
    first = chosen[0]
    for run in chosen[1:]:
        if run.directions != first.directions:
            raise ValueError(f"baseline: STL runs {first.name!r} and {run.name!r} have different "
                             f"tasks, metrics or directions")
    metrics = {task: {m: sum(r.tasks[task][m] for r in chosen) / len(chosen) for m in ms}
               for task, ms in first.directions.items()}
    return Baseline(method=baseline, sparse=sparse, seeds=[r.seed for r in chosen],
                    metrics=metrics, directions=first.directions)


def _run_delta_m(run: Run, base: Baseline | None) -> float | None:
    if base is None:
        return None
    if run.directions != base.directions:
        raise ValueError(f"run {run.name!r}: its tasks, metrics or directions differ from the "
                         f"STL baseline's ({base.describe()})")
    return delta_m(run.tasks, base.metrics, base.directions)


# --- summary.csv -------------------------------------------------------------------------------
def _metric_columns(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order the runs name them (first appearance)."""
    cols: dict[tuple[str, str], None] = {}
    for run in runs:
        for task, metrics in run.tasks.items():
            for metric in metrics:
                cols[(task, metric)] = None
    return list(cols)


def _csv_value(x: object) -> str:
    if x is None:
        return ""
    return repr(x) if isinstance(x, float) else str(x)


def summary_rows(runs: Sequence[Run], missing: Sequence[MissingRun] = (), *,
                 baseline: str = "stl", base_runs: Sequence[Run] | None = None
                 ) -> tuple[list[str], list[list[str]]]:
    """Header and rows of ``summary.csv``: one row per (method, sparse, seed).

    Columns: ``method, sparse, seed, gc_all, gc_last50`` (fractions in [0, 1], empty where the run
    computed no per-task gradients), ``delta_m`` (Δm% against STL, empty without an STL run),
    ``time_s``, one column ``<task>.<metric>`` per final test metric, then ``data, epochs, status``
    ("ok", "missing" or "diverged"), ``run`` (the run directory's name) and ``lr``. Failed runs
    have empty values. ``base_runs``: the runs the STL baseline is taken from (default ``runs``;
    the report passes the runs at the chosen learning rates).
    """
    base = stl_baseline(runs if base_runs is None else base_runs, baseline)
    cols = _metric_columns(runs)
    header = [*SUMMARY_COLUMNS, *(f"{t}.{m}" for t, m in cols), "data", "epochs", "status", "run",
              "lr"]
    rows: list[tuple[tuple, list[str]]] = []
    for run in runs:
        values = [run.method, run.sparse, run.seed, run.gc_all, run.gc_last50,
                  _run_delta_m(run, base), run.time_s,
                  *(run.tasks.get(t, {}).get(m) for t, m in cols), run.data, run.epochs, "ok",
                  run.name, run.lr]
        key = (method_key(run.method), sparse_key(run.sparse), run.seed)
        rows.append((key, [_csv_value(v) for v in values]))
    for miss in missing:
        values = [miss.method, miss.sparse, miss.seed, *[None] * (len(header) - 6), miss.status,
                  miss.name, miss.lr]
        key = (method_key(miss.method or ""), sparse_key(miss.sparse or ""),
               miss.seed if miss.seed is not None else -1)
        rows.append((key, [_csv_value(v) for v in values]))
    return header, [r for _, r in sorted(rows, key=lambda kr: kr[0])]


# --- the tables --------------------------------------------------------------------------------
def _row_label(method: str, sparse: str, has_off: bool) -> str:
    if sparse == "off":
        return display_name(method)
    return f"w/ ST ({sparse})" if has_off else f"{display_name(method)} w/ ST ({sparse})"


def _seed_counts(groups: dict) -> str:
    counts = sorted({len(g) for g in groups.values()})
    return ", ".join(map(str, counts))


def _failed_by_group(failed: Sequence[MissingRun]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for f in failed:
        if f.method is not None and f.sparse is not None:
            out[(f.method, f.sparse)] = out.get((f.method, f.sparse), 0) + 1
    return out


def _with_failed(groups: dict, nfail: dict[tuple[str, str], int], skip: str | None = None
                 ) -> dict:
    """``groups`` plus an empty group for each (method, sparse) whose runs all failed."""
    out = dict(groups)
    for key in nfail:
        if key not in out and key[0] != skip:
            out[key] = []
    return dict(sorted(out.items(), key=lambda kv: (method_key(kv[0][0]), sparse_key(kv[0][1]))))


def _count_cell(n: int, n_failed: int, show: bool) -> str:
    """A row's "seeds" cell: ``n`` complete runs, and ``(failed)`` when the report has any."""
    return f"{n} ({n_failed})" if show else str(n)


_FAILED_NOTE = ("seeds (failed): complete runs averaged in the row, and in parentheses the runs "
                "of the row that failed (diverged or without result.json), left out of every "
                "mean; see \"Failed runs\".")


def format_table_1(runs: Sequence[Run], *, baseline: str = "stl",
                   failed: Sequence[MissingRun] = ()) -> str:
    """Table 1 of the ST paper in Markdown: average incidence of gradient conflict (%) over all
    epochs and over the last 50% of epochs, one row per method and one "w/ ST" row per sparse
    setting, with ST's reduction in points in parentheses. The baseline (STL) method is left out;
    methods that compute no per-task gradients show "—". ``failed``: the failed runs, counted per
    row (a row whose runs all failed shows only its count)."""
    nfail = _failed_by_group(failed)
    groups = _with_failed({k: g for k, g in _groups(runs).items() if k[0] != baseline}, nfail,
                          skip=baseline)
    show = bool(nfail)
    if not groups:
        return "Table 1: no run of a multi-task method."
    lines = [f"Table 1: average incidence of gradient conflict (%, lower is better) on the shared "
             f"parameters, over all epochs and over the last 50% of epochs; mean ± sample std "
             f"over seeds ({_seed_counts(groups)} per row). In parentheses: the reduction by ST "
             f"in points (without ST minus with ST; negative = ST raised the incidence).", "",
             f"| Method | All epochs ↓ | Last 50% epochs ↓ | "
             f"{'seeds (failed)' if show else 'seeds'} |",
             "|---|---:|---:|---:|"]
    no_grad = []
    for (method, sparse), group in groups.items():
        off = groups.get((method, "off"))
        cells = []
        for field in ("gc_all", "gc_last50"):
            stat = _mean_std([getattr(r, field) for r in group])
            text = _fmt(stat, 2, 100.0)
            if sparse != "off" and stat is not None and off is not None:
                off_stat = _mean_std([getattr(r, field) for r in off])
                if off_stat is not None:
                    text += f" ({(off_stat[0] - stat[0]) * 100:.2f})"
            cells.append(text)
        if cells == [DASH, DASH] and group:
            no_grad.append(f"{method} ({sparse})")
        count = _count_cell(len(group), nfail.get((method, sparse), 0), show)
        lines.append(f"| {_row_label(method, sparse, off is not None)} | {cells[0]} | "
                     f"{cells[1]} | {count} |")
    if no_grad:
        lines += ["", f"{DASH}: no incidence recorded (the run computes no per-task gradients): "
                  + ", ".join(no_grad) + "."]
    if show:
        lines += ["", _FAILED_NOTE]
    return "\n".join(lines)


def _table_2_columns(runs: Sequence[Run], max_metric_columns: int):
    """Column specs: (header, getter(run) -> float | None, direction | None)."""
    cols = _metric_columns(runs)
    dirs = {}
    for run in runs:
        for task, ms in run.directions.items():
            for m, d in ms.items():
                dirs.setdefault((task, m), d)
    if len(cols) <= max_metric_columns:
        return [(f"{t}: {m}", (lambda r, t=t, m=m: r.tasks.get(t, {}).get(m)), dirs[(t, m)])
                for t, m in cols], False
    specs = []
    for metric in dict.fromkeys(m for _, m in cols):
        tasks = [t for t, m in cols if m == metric]
        directions = {dirs[(t, metric)] for t in tasks}

        def mean_over_tasks(r: Run, metric=metric, tasks=tasks) -> float | None:
            vals = [r.tasks[t][metric] for t in tasks if metric in r.tasks.get(t, {})]
            return sum(vals) / len(vals) if vals else None
        specs.append((f"{metric} (mean of {len(tasks)} tasks)", mean_over_tasks,
                      directions.pop() if len(directions) == 1 else None))
    return specs, True


def format_table_2(runs: Sequence[Run], *, baseline: str = "stl",
                   max_metric_columns: int = 12, failed: Sequence[MissingRun] = ()) -> str:
    """Table 2 of the ST paper in Markdown: final test metrics per task (arrows: ↑ higher is
    better, ↓ lower is better) and Δm% against STL (lower is better), mean ± sample std over seeds,
    the STL rows first. With more than ``max_metric_columns`` (task, metric) columns (many-task
    data), each metric is shown as its mean over the tasks (``summary.csv`` keeps every column)."""
    if not runs:
        return "Table 2: no complete run."
    base = stl_baseline(runs, baseline)
    specs, averaged = _table_2_columns(runs, max_metric_columns)
    nfail = _failed_by_group(failed)
    show = bool(nfail)
    groups = _with_failed(_groups(runs), nfail)
    order = sorted(groups, key=lambda k: (k[0] != baseline, method_key(k[0]), sparse_key(k[1])))
    if base is None:
        head = (f"Δm% not computed: no `{baseline}` (single-task) run in runs/, so there is no "
                "baseline.")
    else:
        head = (f"Δm% = mean over tasks of the mean over the task's metrics of "
                f"(-1)^u (M - S) / S × 100, u = 1 when higher is better: the relative task drop "
                f"against STL (ST paper / Nash-MTL sign: lower is better, negative = better than "
                f"STL). S = {base.describe()}.")
    lines = [f"Table 2: final test metrics, mean ± sample std over seeds "
             f"({_seed_counts(groups)} per row)"
             + (", each metric averaged over the tasks" if averaged else "") + ". " + head, ""]
    header = ["Method", *(f"{h} {_ARROW.get(d, '')}".rstrip() for h, _, d in specs), "Δm% ↓",
              "seeds (failed)" if show else "seeds"]
    lines += ["| " + " | ".join(header) + " |",
              "|---|" + "---:|" * (len(specs) + 2)]
    for method, sparse in order:
        group = groups[(method, sparse)]
        label = _row_label(method, sparse, (method, "off") in groups)
        if method == baseline and base is not None and sparse == base.sparse:
            label += " (baseline)"
        cells = [_fmt(_mean_std([get(r) for r in group]), 4) for _, get, _ in specs]
        dm = _fmt(_mean_std([_run_delta_m(r, base) for r in group]), 2)
        count = _count_cell(len(group), nfail.get((method, sparse), 0), show)
        lines.append("| " + " | ".join([label, *cells, dm, count]) + " |")
    if show:
        lines += ["", _FAILED_NOTE]
    return "\n".join(lines)


# --- report.md ---------------------------------------------------------------------------------
def _diverged_section(diverged: Sequence[MissingRun]) -> list[str]:
    if not diverged:
        return []
    lines = ["## Failed runs: diverged", "",
             f"{len(diverged)} run{'' if len(diverged) == 1 else 's'} diverged (a non-finite "
             "loss, or validation metrics at chance level on every task: "
             "`gradops.train.engine.divergence`); each stopped at the epoch named and is left "
             "out of every mean and plot (counted in the tables' \"seeds (failed)\"):", "",
             "| run | method | sparse | lr | seed | epoch | task | reason |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for m in diverged:
        lines.append(f"| `{m.name}` | {m.method or '?'} | {m.sparse or '?'} | "
                     f"{'?' if m.lr is None else f'{m.lr:g}'} | "
                     f"{'?' if m.seed is None else m.seed} | "
                     f"{'?' if m.epoch is None else m.epoch} | {m.task or '?'} | {m.reason} |")
    return lines + [""]


def _missing_section(missing: Sequence[MissingRun]) -> list[str]:
    if not missing:
        return []
    lines = ["## Missing runs", "",
             f"{len(missing)} run director{'y' if len(missing) == 1 else 'ies'} under `runs/` "
             "have no usable `result.json`; they are left out of the tables and plots:", "",
             "| run | method | sparse | seed | reason |", "|---|---|---|---:|---|"]
    for m in missing:
        lines.append(f"| `{m.name}` | {m.method or '?'} | {m.sparse or '?'} | "
                     f"{'?' if m.seed is None else m.seed} | {m.reason} |")
    return lines + [""]


def _header(runs: Sequence[Run], missing: Sequence[MissingRun]) -> list[str]:
    data = sorted({r.data for r in runs})
    epochs = sorted({r.epochs for r in runs})
    seeds = sorted({r.seed for r in runs})
    backbones = sorted({r.backbone for r in runs if r.backbone is not None})
    total = sum(r.time_s for r in runs)
    return [f"# gradops compare: `{', '.join(data)}`", "",
            f"Data set `{', '.join(data)}`, backbone "
            f"{', '.join(f'`{b}`' for b in backbones) or 'not recorded'}, "
            f"{', '.join(map(str, epochs))} epoch(s), seed(s) {', '.join(map(str, seeds))}; "
            f"{len(runs)} complete run(s), {sum(m.status != 'diverged' for m in missing)} "
            f"missing, {sum(m.status == 'diverged' for m in missing)} diverged. Training time of "
            f"the runs: "
            f"{total:.1f} s in total.", "",
            "Files: [`summary.csv`](summary.csv) (one row per (method, sparse, seed) and rate, "
            "per-task test metrics, Δm%, incidences as fractions, status), run directories under "
            "`runs/`.", ""]


def _image(title: str, path: Path | None, why_not: str) -> list[str]:
    if path is None:
        return [f"*{title}: not drawn ({why_not}).*", ""]
    return [f"![{title}]({path.name})", ""]


def _plot_section(runs: Sequence[Run], out_dir: Path, baseline: str = "stl") -> list[str]:
    from . import plots as P  # matplotlib is imported here, not with gradops

    lines = ["## Plots", "", "### Incidence of gradient conflict per epoch (ST paper, Fig. 4)", "",
             "Mean over seeds; solid: without ST, dashed/dotted: with ST.", ""]
    lines += _image("incidence of gradient conflict per epoch",
                    P.plot_incidence_per_epoch(runs, out_dir / "incidence_per_epoch.png"),
                    "no run recorded a per-epoch incidence")
    lines += ["### Average incidence, all epochs and last 50% (ST paper, Fig. 1)", ""]
    lines += _image("average incidence of gradient conflict",
                    P.plot_incidence_average(runs, out_dir / "incidence_average.png"),
                    "no run recorded an incidence")
    lines += ["### Distribution of pairwise gradient cosines", "",
              "Task pairs' cosines on the shared parameters over all training steps and seeds, "
              "as a fraction of the pairs; left of 0: conflict.", ""]
    lines += _image("distribution of pairwise cosines",
                    P.plot_cosine_hist(runs, out_dir / "cosine_hist.png"),
                    "no run recorded a cosine histogram")
    lines += ["### Per-layer conflict counts", "",
              "Pairs of tasks with a negative cosine on one layer's parameters, summed over the "
              "steps of each epoch (first seed of each (method, sparse)).", ""]
    heat = P.plot_layer_conflicts(runs, out_dir)
    if not heat:
        lines += ["*Not drawn (no run recorded per-layer conflict counts).*", ""]
    for method, path in heat.items():
        lines += [f"![per-layer conflicts: {display_name(method)}]({path.name})", ""]
    split_path = P.plot_task_metrics(runs, out_dir / "task_metrics.png")
    split = split_path[1] if split_path is not None else None
    lines += [f"### Task metrics over epochs ({split or 'val or test'} split)", ""]
    lines += _image("task metrics over epochs", None if split_path is None else split_path[0],
                    "no metrics.jsonl with val or test lines")
    base = stl_baseline(runs, baseline)
    lines += ["### Incidence and Δm% against the trainable fraction (ST paper, Fig. 5(b))", "",
              "Mean ± std over seeds; x: each run's trainable fraction of the encoder (1.0: "
              "without ST).", ""]
    lines += _image("incidence and delta m against the trainable fraction",
                    plot_fraction_sweep(runs, lambda r: _run_delta_m(r, base),
                                        out_dir / "fraction_sweep.png", baseline=baseline),
                    f"fewer than {MIN_FRACTIONS} trainable fractions (counting `off` as 1.0) for "
                    "every method and selection rule; e.g. `--sparse off,0.1,0.3,0.45,0.6,0.8`")
    return lines


def report_sections(runs: Sequence[Run], missing: Sequence[MissingRun] = (), *,
                    baseline: str = "stl") -> dict[str, object]:
    """The report's sections after the header, title -> Markdown (also what ``compare`` prints):
    the learning-rate choice (with several rates), Tables 1-2, "Does it reproduce?" and the epoch
    choices, all on the runs at the chosen rates (under the key ``"_runs"``), failed runs
    counted per row and left out of every mean."""
    sel = select_lr(runs, missing, baseline=baseline)
    chosen, failed = sel.runs, sel.failed
    base = stl_baseline(chosen, baseline) if chosen else None
    out: dict[str, object] = {}
    if sel.active:
        out["Learning rate, chosen on validation"] = format_lr_table(
            sel, lambda rs: _fmt(_mean_std([_run_delta_m(r, base) for r in rs]), 2))
    if chosen:
        out["Table 1: incidence of gradient conflict"] = format_table_1(
            chosen, baseline=baseline, failed=failed)
        out["Table 2: task performance and Δm%"] = format_table_2(
            chosen, baseline=baseline, failed=failed)
        out["Does it reproduce?"] = format_reproduction(
            chosen, lambda r: _run_delta_m(r, base), baseline=baseline)
        out["Which epoch: final, last-10 mean, best on val"] = format_epoch_table(
            _with_failed(_groups(chosen), _failed_by_group(failed)), base, failed=failed)
    out["_runs"] = chosen
    return out


def write_report(out_dir: str | Path, *, baseline: str = "stl", plots: bool = True) -> Path:
    """Read every run directory under ``out_dir/runs/`` and write ``out_dir/summary.csv``,
    ``out_dir/report.md`` and (``plots=True``) the PNG plots it links; return the path of
    ``report.md``. See the module docstring for what each holds.

    Args:
        out_dir: the ``--out`` directory of ``gradops compare``.
        baseline: the single-task method Δm% is measured against.
        plots: draw the PNG plots (needs matplotlib, part of ``gradops[train]``).

    Raises:
        FileNotFoundError: ``out_dir/runs`` is not a directory.
        ValueError: no run directory at all; complete runs of different data sets; two runs with
            the same (method, sparse, seed); runs whose tasks differ from the STL baseline's.
        ImportError: ``plots=True`` without matplotlib.
    """
    out_dir = Path(out_dir)
    runs, missing = load_runs(out_dir)
    if not runs and not missing:
        raise ValueError(f"out_dir: no run directory under {out_dir / 'runs'}")
    data = sorted({r.data for r in runs})
    if len(data) > 1:
        raise ValueError(f"out_dir: the runs under {out_dir / 'runs'} are on different data sets "
                         f"{data}; write one report per data set")
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError as e:
            raise ImportError("write_report(plots=True) needs matplotlib: pip install "
                              "'gradops[train]' (or pass plots=False)") from e
    sections = report_sections(runs, missing, baseline=baseline)
    chosen = sections.pop("_runs")
    header, rows = summary_rows(runs, missing, baseline=baseline, base_runs=chosen)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(out_dir / "summary.csv", buf.getvalue())

    lines = (_header(runs, missing)
             + _diverged_section([m for m in missing if m.status == "diverged"])
             + _missing_section([m for m in missing if m.status != "diverged"]))
    if runs:
        for title, text in sections.items():
            lines += [f"## {title}", "", text, ""]
        if plots and chosen:
            lines += _plot_section(chosen, out_dir, baseline)
    else:
        lines += ["No complete run: no table or plot.", ""]
    notes = [f"- `{r.name}`: {note}" for r in runs for note in r.notes]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
