"""Recon's claim checked over seeds: ``gradops recon compare --seeds 0,1,2``.

Recon (Shi et al., "Recon: Reducing Conflicting Gradients from the Root for Multi-Task Learning",
ICLR 2023, Table 6) claims that turning the top-``K`` layers of the S-conflict ranking into
task-specific layers lowers the share of conflicting task pairs on the layers that stay shared.
:func:`recon_seeds` runs, for every seed, the search
(:func:`gradops.train.runs.recon_search.recon_search`) on that seed unless a ranking is given, then
the before/after table (:func:`gradops.train.recon.search.conflict_table`) from that seed.
:func:`format_recon_report` writes Recon's Table 6 per seed and the paired change per seed of the
share of pairs with ``cos < -0.01`` on the layers that stay shared (after minus before branching,
same seed, in points), its mean ± std, the seeds agreeing in sign and the verdict of
:func:`gradops.train.report.verdicts.verdict` (claim sign ``"<0"``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..config.atomic import atomic_write_text
from ..config.schema import TrainConfig
from .verdicts import MIN_SEEDS, T_MIN, Paired, format_mean_std, format_number
from ..config.extras import read_ranking
from ..recon.search import conflict_table, conflict_table_markdown
from ..runs.recon_search import recon_search

__all__ = ["CLAIM", "recon_seeds", "paired_change", "format_recon_report",
           "format_console_summary", "rule_text", "seed_dir"]

CLAIM = ("branching the top-K layers lowers the share of conflicting pairs (cos < -0.01) on "
         "the layers that stay shared")
#: the cumulative shares of the report (Recon's Table 6 bins, read as "cos below")
_BELOW = (("cos < -0.01", ("[-0.02, -0.01)", "[-0.03, -0.02)", "[-1, -0.03)")),
          ("cos < -0.02", ("[-0.03, -0.02)", "[-1, -0.03)")),
          ("cos < -0.03", ("[-1, -0.03)",)))


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"s{seed}"


def recon_seeds(cfg: TrainConfig, seeds: list[int], topk: int, iters: int, S: float,
                out: str | Path, *, ranking: str | None = None, init: str = "reinit",
                progress: bool = False) -> list[dict[str, Any]]:
    """One before/after table per seed (``out/s<seed>/conflict_table.json``); without
    ``ranking``, the search of that seed first (``out/s<seed>/search/``). The caller holds
    ``out``'s lock. Returns the tables, each with ``seed`` and ``ranking_source``."""
    fixed = read_ranking(ranking, "--ranking") if ranking is not None else None
    tables = []
    for seed in seeds:
        c = dataclasses.replace(cfg, seed=seed)
        d = seed_dir(out, seed)
        if fixed is None:
            rank = recon_search(c, iters, S, d / "search", overwrite=True, progress=progress)
            source = f"search on seed {seed} ({iters} iterations, S = {S:g}): {d.name}/search/"
        else:
            rank, source = fixed, f"given: {ranking}"
        table = conflict_table(c, rank, topk, iters, init=init)
        table.update(seed=seed, ranking_source=source, S=float(S) if fixed is None else None)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "conflict_table.json", json.dumps(table, indent=1) + "\n")
        atomic_write_text(d / "conflict_table.md", conflict_table_markdown(table))
        tables.append(table)
    return tables


def paired_change(tables: list[dict[str, Any]]) -> Paired:
    """seed -> after - before (points) of the share with ``cos < -0.01`` on the layers that
    stay shared, as a :class:`~gradops.train.report.verdicts.Paired` (claim sign ``"<0"``)."""
    diffs = {t["seed"]: t["severe_share"]["after_remaining"]
             - t["severe_share"]["before_remaining"] for t in tables}
    return Paired("recon", "recon", f"top-{len(tables[0]['branched'])}" if tables else "",
                  diffs, "<0")


def _share(col: dict[str, float], bins: tuple[str, ...]) -> float:
    return sum(col[b] for b in bins)


def rule_text() -> str:
    return (f"Verdict rule (`gradops.train.report.verdicts.verdict`, n seeds, t = mean / "
            f"(std / √n)): fewer than {MIN_SEEDS} seeds → inconclusive; **holds** when every "
            f"seed's difference is negative and |t| ≥ {T_MIN:g}; **does not hold** when every "
            f"seed's difference is positive and |t| ≥ {T_MIN:g}; else inconclusive.")


def format_recon_report(tables: list[dict[str, Any]], header: list[str]) -> str:
    """``report.md``: the setting (``header`` lines), Recon's Table 6 per seed and the paired
    change with its verdict."""
    lines = ["# Recon: conflicts on the layers that stay shared, before and after branching",
             "", *header, ""]
    for t in tables:
        cols = list(t["columns"])
        lines += [f"## Seed {t['seed']}", "",
                  f"Branched: {', '.join(t['branched'])}. Ranking: {t['ranking_source']}. "
                  f"Stay shared: {', '.join(t['remaining_layers'])}. Each model trained "
                  f"{t['iters']} iterations; both took {t['time_s']:.0f} s.", "",
                  "| cos(phi_ij) | " + " | ".join(cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        for label in t["bins"]:
            lines.append(f"| {label} | " + " | ".join(f"{t['columns'][c][label]:.2f}"
                                                      for c in cols) + " |")
        for label, bins in _BELOW:
            lines.append(f"| **{label}** | " + " | ".join(
                f"{_share(t['columns'][c], bins):.2f}" for c in cols) + " |")
        lines.append("")
    p = paired_change(tables)
    mean, std = p.mean_std()
    ms = format_mean_std(mean, std)
    lines += ["## Does it reproduce?", "",
              f"Recon's claim: {CLAIM}. Paired difference per seed: share with cos < -0.01 on "
              "the layers that stay shared, after minus before branching (same seed, points; "
              "Recon's Table 6 reports a reduction of 67-79%).", "", rule_text(), "",
              "| seed | branched | before (%) | after (%) | after − before (points) |",
              "|---:|---|---:|---:|---:|"]
    for t in tables:
        b, a = (t["severe_share"][k] for k in ("before_remaining", "after_remaining"))
        lines.append(f"| {t['seed']} | {', '.join(t['branched'])} | {b:.2f} | {a:.2f} | "
                     f"{format_number(a - b)} |")
    lines += ["", f"Mean ± std: {ms} points; seeds agreeing with the claim (negative): "
              f"{p.agree}/{p.n}; verdict: **{p.verdict}**.", ""]
    return "\n".join(lines)


def format_console_summary(tables: list[dict[str, Any]]) -> str:
    """The paired section's lines for the console."""
    p = paired_change(tables)
    mean, std = p.mean_std()
    ms = format_mean_std(mean, std)
    per = ", ".join(f"s{s}: {format_number(d)}" for s, d in p.diffs.items())
    return (f"share with cos < -0.01 on the layers that stay shared, after - before (points): "
            f"{per}; mean ± std {ms}; agreeing {p.agree}/{p.n}; verdict on Recon's claim: "
            f"{p.verdict}")
