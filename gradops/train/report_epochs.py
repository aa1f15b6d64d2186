"""Which epoch to report: the final epoch, the mean of the last 10 epochs, and the epoch best on
the validation split.

The papers disagree: MTAN (Liu et al., CVPR 2019) and Nash-MTL (Navon et al., ICML 2022) average
the test metrics of the last 10 epochs; LibMTL and FAMO's CelebA experiment (Liu et al., 2023)
report the epoch that is best on the validation split. The report shows Δm% under each choice:

- ``final``: the test metrics of the last epoch (``result.json``);
- ``last10``: per metric, the mean of the test metrics of the last ``min(10, E)`` epochs;
- ``best_val``: the test metrics of the epoch whose *validation* metrics have the lowest Δm%
  against the same baseline (ties: the earliest). On NYUv2 and CityScapes the papers'
  validation split is their test split, so this choice is optimistic there.
"""
from __future__ import annotations

from collections.abc import Sequence

from .delta_m import delta_m

__all__ = ["LAST_EPOCHS", "epoch_choices", "format_epoch_table"]

LAST_EPOCHS = 10


def _split_lines(run, split: str) -> dict[int, dict[str, dict[str, float]]]:
    return {ln.epoch: ln.metrics for ln in run.log if ln.split == split}


def epoch_choices(run, base) -> dict[str, float | int | None]:
    """``{"final", "last10", "best_val": Δm%, "best_epoch": int}`` of ``run`` against the
    :class:`~gradops.train.report.Baseline` ``base`` (None entries when the log lacks them)."""
    dirs = base.directions
    out: dict[str, float | int | None] = {"final": delta_m(run.tasks, base.metrics, dirs),
                                          "last10": None, "best_val": None, "best_epoch": None}
    test = _split_lines(run, "test")
    if test:
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


def format_epoch_table(groups: dict, base) -> str:
    """A Markdown table, one row per ``(method, sparse)`` group of runs: Δm% (lower is better)
    under the three epoch choices, mean ± sample std over seeds, and the best-on-val epochs."""
    if base is None:
        return "Not computed: no baseline for Δm%."
    lines = [f"Δm% (lower is better) under three choices of epoch: the final epoch, the mean of "
             f"the test metrics of the last {LAST_EPOCHS} epochs (MTAN, Nash-MTL), and the "
             "epoch best on the val split (LibMTL, FAMO's CelebA). Baseline: "
             f"{base.describe()}.", "",
             "| Method | sparse | final | last-10 mean | best on val | best epochs |",
             "|---|---|---:|---:|---:|---|"]
    for (method, sparse), runs in groups.items():
        if any(r.directions != base.directions for r in runs):
            continue
        ch = [epoch_choices(r, base) for r in runs]
        lines.append(f"| {method} | {sparse} | {_fmt([c['final'] for c in ch])} | "
                     f"{_fmt([c['last10'] for c in ch])} | {_fmt([c['best_val'] for c in ch])} "
                     f"| {', '.join(str(c['best_epoch']) for c in ch)} |")
    return "\n".join(lines)
