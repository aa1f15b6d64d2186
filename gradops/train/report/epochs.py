"""Which epoch to report: the final epoch, the mean of the last 10 epochs, and the epoch best on
the validation split.

The papers disagree: MTAN (Liu et al., CVPR 2019) and Nash-MTL (Navon et al., ICML 2022) average
the test metrics of the last 10 epochs; LibMTL and FAMO's CelebA experiment (Liu et al., 2023)
report the epoch that is best on the validation split. The report shows Δm% under each choice:

- ``final``: the test metrics of the last epoch (``result.json``);
- ``last10``: per metric, the mean of the test metrics of the last 10 epochs, only for runs of
  at least :data:`LAST10_MIN_EPOCHS` (20) epochs: the papers average the last 10 of 200 epochs,
  a window at the end of training; on a shorter run it would average most of training (on 8
  epochs: every epoch, the first included), so the column is left out and the report says why;
- ``best_val``: the test metrics of the epoch whose *validation* metrics have the lowest Δm%
  against the same baseline (ties: the earliest). On NYUv2 and CityScapes the papers'
  validation split is their test split, so this choice is optimistic there.
"""
from __future__ import annotations

from collections.abc import Sequence

from .delta_m import delta_m

__all__ = ["LAST10_MIN_EPOCHS", "LAST_EPOCHS", "epoch_choices", "format_epoch_table"]

LAST_EPOCHS = 10
#: The fewest epochs for which the last-10 mean is reported (the 10 epochs are then at most the
#: second half of training).
LAST10_MIN_EPOCHS = 20


def _split_lines(run, split: str) -> dict[int, dict[str, dict[str, float]]]:
    return {ln.epoch: ln.metrics for ln in run.log if ln.split == split}


def epoch_choices(run, base) -> dict[str, float | int | None]:
    """``{"final", "last10", "best_val": Δm%, "best_epoch": int}`` of ``run`` against the
    :class:`~gradops.train.report.baseline.Baseline` ``base`` (None entries when the log lacks
    them)."""
    dirs = base.directions
    out: dict[str, float | int | None] = {"final": delta_m(run.tasks, base.metrics, dirs),
                                          "last10": None, "best_val": None, "best_epoch": None}
    test = _split_lines(run, "test")
    if test and run.epochs >= LAST10_MIN_EPOCHS:
        epochs = sorted(test)[-LAST_EPOCHS:]
        mean = {t: {m: sum(test[e][t][m] for e in epochs) / len(epochs) for m in ms}
                for t, ms in dirs.items()}
        out["last10"] = delta_m(mean, base.metrics, dirs)
    val = _split_lines(run, "val")
    scored = [(delta_m(val[e], base.metrics, dirs), e) for e in sorted(val) if e in test]
    if scored:
        best, epoch = min(scored)
        out["best_val"] = delta_m(test[epoch], base.metrics, dirs)
        out["best_epoch"] = epoch
    return out


def _fmt(values: Sequence[float | None]) -> str:
    xs = [v for v in values if v is not None]
    if not xs:
        return "—"
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.2f}"
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{m:.2f} ± {sd:.2f}"


def format_epoch_table(groups: dict, base, failed=()) -> str:
    """A Markdown table, one row per ``(method, sparse)`` group of runs: Δm% (lower is better)
    under the epoch choices, mean ± sample std over seeds, the best-on-val epochs and the seeds
    (with the failed runs of the row, ``failed``, in parentheses when there are any). The
    last-10 column is shown only when every run has at least :data:`LAST10_MIN_EPOCHS` epochs;
    otherwise a sentence says why it is absent."""
    if base is None:
        return "Not computed: no baseline for Δm%."
    epochs = sorted({r.epochs for runs in groups.values() for r in runs})
    last10 = bool(epochs) and epochs[0] >= LAST10_MIN_EPOCHS
    nfail: dict = {}
    for f in failed:
        nfail[(f.method, f.sparse)] = nfail.get((f.method, f.sparse), 0) + 1
    show = bool(nfail)
    if last10:
        head = (f"Δm% (lower is better) under three choices of epoch: the final epoch, the mean "
                f"of the test metrics of the last {LAST_EPOCHS} epochs (MTAN, Nash-MTL), and "
                "the epoch best on the val split (LibMTL, FAMO's CelebA).")
    else:
        head = (f"Δm% (lower is better) under two choices of epoch: the final epoch and the "
                f"epoch best on the val split (LibMTL, FAMO's CelebA). The last-{LAST_EPOCHS} "
                f"mean (MTAN, Nash-MTL) is not shown: it needs runs of at least "
                f"{LAST10_MIN_EPOCHS} epochs, so that its {LAST_EPOCHS} epochs are the end of "
                f"training (the papers average the last 10 of 200), and these runs have "
                f"{', '.join(map(str, epochs))} epoch(s): the mean would take in most of "
                "training.")
    cols = ["Method", "sparse", "final"] + (["last-10 mean"] if last10 else []) + \
        ["best on val", "best epochs", "seeds (failed)" if show else "seeds"]
    lines = [f"{head} Baseline: {base.describe()}.", "", "| " + " | ".join(cols) + " |",
             "|---|---|" + "---:|" * (len(cols) - 4) + "---|---:|"]
    for (method, sparse), runs in groups.items():
        if any(r.directions != base.directions for r in runs):
            continue
        ch = [epoch_choices(r, base) for r in runs]
        cells = [method, sparse, _fmt([c["final"] for c in ch])]
        if last10:
            cells.append(_fmt([c["last10"] for c in ch]))
        n_f = nfail.get((method, sparse), 0)
        cells += [_fmt([c["best_val"] for c in ch]),
                  ", ".join(str(c["best_epoch"]) for c in ch),
                  f"{len(runs)} ({n_f})" if show else str(len(runs))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
