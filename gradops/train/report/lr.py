"""The learning rate as a grid axis: per (method, sparse), the rate with the best *validation* Δm%.

``gradops compare --lr 2e-3,8e-3`` trains every (method, sparse, seed) at every rate. The report
then keeps, per (method, sparse), the runs of one rate, chosen on the validation split only
(never on test: the test metrics of the chosen rate are what Tables 1-2 report):

1. The single-task baseline (``stl``) first: its rate is the one whose runs' final-epoch
   validation metrics have the lowest mean Δm% against the mean validation metrics of all of
   its runs (every rate); the STL runs of that rate are the baseline of everything else.
2. Every other (method, sparse): the rate whose runs' final-epoch validation metrics have the
   lowest mean Δm% (over seeds) against the chosen STL runs' mean validation metrics (without
   STL runs in the grid: against the mean validation metrics of every complete run, which ranks
   the rates the same way for all groups).

A rate at which some run of the group failed (diverged or missing) is chosen only when every
rate has a failure; ties go to the smaller rate. Scores use the last ``val`` line of each run's
``metrics.jsonl`` (the final epoch, as Table 2 uses the final test metrics).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .delta_m import delta_m
from .data import MissingRun, Run, display_name, method_key, sparse_key

__all__ = ["LrSelection", "final_val_metrics", "format_lr_table", "select_lr"]

Key = tuple[str, str]


def final_val_metrics(run: Run) -> dict[str, dict[str, float]] | None:
    """The validation metrics of the run's last logged epoch (None without a val line)."""
    vals = [ln for ln in run.log if ln.split == "val"]
    return max(vals, key=lambda ln: ln.epoch).metrics if vals else None


def _val_dm(run: Run, ref: dict[str, dict[str, float]] | None) -> float | None:
    val = final_val_metrics(run)
    if val is None or ref is None:
        return None
    try:
        return delta_m(val, ref, run.directions)
    except (ValueError, TypeError):
        return None


def _mean_metrics(runs: Sequence[Run]) -> dict[str, dict[str, float]] | None:
    vals = [v for v in (final_val_metrics(r) for r in runs) if v is not None]
    if not vals:
        return None
    first = vals[0]
    return {t: {m: sum(v[t][m] for v in vals) / len(vals) for m in ms} for t, ms in first.items()}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One rate of one (method, sparse): its runs, failures and mean validation Δm%."""
    lr: float | None
    runs: list[Run]
    failed: list[MissingRun]
    val_dm: float | None


@dataclasses.dataclass(frozen=True)
class LrSelection:
    """The runs (and failed runs) at the chosen rate of each (method, sparse)."""
    runs: list[Run]
    failed: list[MissingRun]
    chosen: dict[Key, float | None]                 # empty with a single rate
    candidates: dict[Key, list[Candidate]]          # empty with a single rate
    reference: str                                  # what the val Δm% is measured against

    @property
    def active(self) -> bool:
        return bool(self.chosen)


def _pick(cands: list[Candidate]) -> Candidate | None:
    scored = [c for c in cands if c.val_dm is not None]
    if not scored:
        return None
    clean = [c for c in scored if not c.failed] or scored
    return min(clean, key=lambda c: (c.val_dm, c.lr if c.lr is not None else 0.0))


def select_lr(runs: Sequence[Run], failed: Sequence[MissingRun] = (), *,
              baseline: str = "stl") -> LrSelection:
    """Choose each (method, sparse)'s rate on validation Δm% (see the module docstring). With a
    single rate in the grid, every run is kept and nothing is chosen."""
    rates = {r.lr for r in runs if r.lr is not None} | {f.lr for f in failed
                                                        if f.lr is not None}
    if len(rates) <= 1:
        return LrSelection(list(runs), list(failed), {}, {}, "")
    keys: dict[Key, None] = {}
    for x in sorted([*runs, *(f for f in failed if f.method and f.sparse)],
                    key=lambda x: (method_key(x.method), sparse_key(x.sparse))):
        keys[(x.method, x.sparse)] = None

    def candidates(key: Key, ref) -> list[Candidate]:
        out = []
        for lr in sorted({r.lr for r in runs if (r.method, r.sparse) == key}
                         | {f.lr for f in failed if (f.method, f.sparse) == key},
                         key=lambda v: (v is None, v or 0.0)):
            rs = [r for r in runs if (r.method, r.sparse, r.lr) == (*key, lr)]
            fs = [f for f in failed if (f.method, f.sparse, f.lr) == (*key, lr)]
            dms = [d for d in (_val_dm(r, ref) for r in rs) if d is not None]
            out.append(Candidate(lr, rs, fs, sum(dms) / len(dms) if dms else None))
        return out

    chosen: dict[Key, float | None] = {}
    cands: dict[Key, list[Candidate]] = {}
    base_runs = [r for r in runs if r.method == baseline]
    ref, reference = None, ""
    if base_runs:
        base_sparse = min({r.sparse for r in base_runs}, key=sparse_key)
        key = (baseline, base_sparse)
        cands[key] = candidates(key, _mean_metrics([r for r in base_runs
                                                    if r.sparse == base_sparse]))
        pick = _pick(cands[key])
        chosen[key] = None if pick is None else pick.lr
        if pick is not None:
            ref = _mean_metrics(pick.runs)
            reference = (f"the `{baseline}` runs (sparse `{base_sparse}`) at their chosen rate "
                         f"{pick.lr:g}, mean validation metrics")
    if ref is None:
        ref = _mean_metrics(list(runs))
        reference = "the mean validation metrics of every complete run (no usable STL runs)"
    for key in keys:
        if key in cands:
            continue
        cands[key] = candidates(key, ref)
        pick = _pick(cands[key])
        chosen[key] = None if pick is None else pick.lr
    sel_runs, sel_failed = [], []
    for key, cs in cands.items():
        for c in cs:
            if chosen[key] is None or c.lr == chosen[key]:
                sel_runs += c.runs if chosen[key] is not None else []
                sel_failed += c.failed
    sel_failed += [f for f in failed if not (f.method and f.sparse)]
    return LrSelection(sel_runs, sel_failed, chosen, cands, reference)


def format_lr_table(sel: LrSelection, test_dm=None) -> str:
    """The selection in Markdown: one row per (method, sparse, rate) with its mean validation
    Δm%, its runs (failed), and the picked rate marked; ``test_dm(runs)`` (mean test Δm% text)
    is shown on the picked rows only, since the choice never looks at test."""
    if not sel.active:
        return "A single learning rate: nothing selected."
    lines = ["Per (method, sparse), the learning rate whose runs have the lowest mean Δm% on the "
             "**validation** split (final epoch; lower is better) against "
             f"{sel.reference}. Test metrics are never used to choose; the test Δm% is shown "
             "for the picked rate only, and Tables 1-2 and the reproduction section use the "
             "picked rate's runs. A rate with a failed run is picked only when every rate has "
             "one.", "",
             "| Method | sparse | lr | val Δm% ↓ | runs (failed) | picked | test Δm% at the pick |",
             "|---|---|---:|---:|---:|---|---:|"]
    for (method, sparse), cands in sel.candidates.items():
        pick = sel.chosen.get((method, sparse))
        for c in cands:
            picked = pick is not None and c.lr == pick
            lr = "?" if c.lr is None else f"{c.lr:g}"
            val = "—" if c.val_dm is None else f"{c.val_dm:.2f}"
            test = (test_dm(c.runs) if (picked and test_dm is not None) else "")
            lines.append(f"| {display_name(method)} | {sparse} | {lr} | {val} | "
                         f"{len(c.runs)} ({len(c.failed)}) | {'**picked**' if picked else ''} | "
                         f"{test} |")
        if pick is None:
            lines.append(f"| {display_name(method)} | {sparse} | — | — | — | none: no rate has "
                         f"a complete run with a val line | |")
    return "\n".join(lines)
