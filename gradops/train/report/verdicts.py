""""Does it reproduce?": the Sparse Training paper's claims, checked per method on paired seeds.

The claims of Zhang et al., "Proactive Gradient Conflict Mitigation in Multi-Task Learning: A
Sparse Training Perspective" (2024; Table 1, Table 2, Fig. 1, Fig. 4):

- **(a)** sparse training (ST) lowers the incidence of gradient conflict over all epochs;
- **(b)** it lowers it more over the last 50% of epochs than over all epochs;
- **(c)** ST improves Δm% (lower is better, :mod:`gradops.train.report.delta_m`);
- **(d)** gradient-manipulation methods do not lower the incidence compared with Joint Train (EW).

Each claim is checked per method on **paired per-seed differences** (same method, same seed):

- (a) ``d = 100 (gc_all[ST] - gc_all[off])``, in points; the claim says ``d < 0``;
- (b) ``d = 100 ((gc_last50[ST] - gc_last50[off]) - (gc_all[ST] - gc_all[off]))``: the change
  over the last 50% minus the change over all epochs; the claim says ``d < 0``;
- (c) ``d = Δm%[ST] - Δm%[off]``; the claim says ``d < 0``;
- (d) ``d = 100 (gc_all[method] - gc_all[ew])``, both without ST, for the gradient-manipulation
  methods (:data:`GRADIENT_MANIPULATION`); the claim says ``d >= 0`` (not lowered).

The verdict (:func:`verdict`) uses the ``n`` paired seeds, their mean ``m``, sample standard
deviation ``s`` and ``t = m / (s / sqrt(n))`` (``|t|`` infinite when ``s = 0`` and ``m != 0``):

- fewer than :data:`MIN_SEEDS` paired seeds: **inconclusive**;
- claims (a)-(c) (``d < 0``): **holds** when every seed's ``d < 0`` and ``|t| >= T_MIN``;
  **does not hold** when every seed's ``d > 0`` and ``|t| >= T_MIN`` (the data show the
  reverse); **inconclusive** otherwise (mixed signs, a zero difference, or ``|t| < T_MIN``);
- claim (d) (``d >= 0``): **holds** when no seed has ``d < 0``; **does not hold** when every
  seed's ``d < 0`` and ``|t| >= T_MIN`` (the method clearly lowers the incidence);
  **inconclusive** otherwise.

With all seeds of one sign, ``|t| >= 1`` always holds, so ``T_MIN = 2`` is the part of the rule
that asks for a difference that is large against its seed-to-seed spread (about a two-sided 90%
level for the three seeds of the default grid, t with 2 degrees of freedom: 2.92).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from ...weighting import method_names
from .data import Run, display_name, method_key, sparse_key

__all__ = ["CLAIMS", "GRADIENT_MANIPULATION", "MIN_SEEDS", "T_MIN", "Paired", "format_mean_std",
           "format_number", "format_reproduction", "paired_claims", "verdict"]

#: The least paired seeds a verdict other than "inconclusive" needs.
MIN_SEEDS = 2
#: The least ``|mean| / (std / sqrt(n))`` for "holds" / "does not hold".
T_MIN = 2.0
#: The gradient-manipulation methods of claim (d) (the loss-weighting ones, UW / DWA / FAMO,
#: and Joint Train itself are not).
GRADIENT_MANIPULATION = method_names(("gram", "layer", "elementwise"))
CLAIMS = {
    "a": "ST lowers the incidence of gradient conflict over all epochs",
    "b": "ST lowers the incidence more over the last 50% of epochs than over all epochs",
    "c": "ST improves Δm% (lowers it)",
    "d": "gradient-manipulation methods do not lower the incidence compared with Joint Train "
         "(ew)",
}
_DIFF = {
    "a": "100 (gc_all[ST] - gc_all[off]), points",
    "b": "100 ((gc_last50[ST] - gc_last50[off]) - (gc_all[ST] - gc_all[off])), points",
    "c": "Δm%[ST] - Δm%[off], points",
    "d": "100 (gc_all[method] - gc_all[ew]), both without ST, points",
}
HOLDS, NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def _stats(diffs: Sequence[float]) -> tuple[float, float | None, float | None]:
    """Mean, sample std (None for n < 2) and t (None for n < 2)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None, None
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if std == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
    return mean, std, t


def verdict(diffs: Sequence[float], claim_sign: str) -> str:
    """The verdict on paired differences (see the module docstring). ``claim_sign``: ``"<0"``
    (claims (a)-(c): the difference is negative) or ``">=0"`` (claim (d): not negative)."""
    if claim_sign not in ("<0", ">=0"):
        raise ValueError(f"verdict: claim_sign must be '<0' or '>=0', got {claim_sign!r}")
    diffs = [float(d) for d in diffs]
    if any(not math.isfinite(d) for d in diffs) or len(diffs) < MIN_SEEDS:
        return INCONCLUSIVE
    _, _, t = _stats(diffs)
    strong = t is not None and abs(t) >= T_MIN
    all_neg = all(d < 0 for d in diffs)
    if claim_sign == "<0":
        if all_neg and strong:
            return HOLDS
        if all(d > 0 for d in diffs) and strong:
            return NOT_HOLD
        return INCONCLUSIVE
    if all(d >= 0 for d in diffs):
        return HOLDS
    if all_neg and strong:
        return NOT_HOLD
    return INCONCLUSIVE


def _agrees(d: float, claim_sign: str) -> bool:
    return d < 0 if claim_sign == "<0" else d >= 0


@dataclasses.dataclass(frozen=True)
class Paired:
    """One claim for one method (and ST setting): the per-seed differences and the verdict."""
    claim: str
    method: str
    setting: str                  # the ST setting (claims a-c) or "off" (claim d)
    diffs: dict[int, float]       # seed -> paired difference
    claim_sign: str

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def agree(self) -> int:
        return sum(_agrees(d, self.claim_sign) for d in self.diffs.values())

    @property
    def verdict(self) -> str:
        return verdict(list(self.diffs.values()), self.claim_sign)

    def mean_std(self) -> tuple[float | None, float | None]:
        if not self.diffs:
            return None, None
        mean, std, _ = _stats(list(self.diffs.values()))
        return mean, std


def _by_seed(runs: Sequence[Run]) -> dict[int, Run]:
    return {r.seed: r for r in runs}


def _pair(a: Sequence[Run], b: Sequence[Run], value: Callable[[Run, Run], float | None]
          ) -> dict[int, float]:
    """seed -> value(a's run, b's run) over the seeds both have (and where it is defined)."""
    A, B = _by_seed(a), _by_seed(b)
    out = {}
    for seed in sorted(set(A) & set(B)):
        v = value(A[seed], B[seed])
        if v is not None:
            out[seed] = v
    return out


def paired_claims(runs: Sequence[Run], dm: Callable[[Run], float | None], *,
                  baseline: str = "stl") -> list[Paired]:
    """Every (claim, method, setting) the runs allow; ``dm(run)`` is the run's Δm% (None when
    there is no baseline). Diverged or missing runs must not be in ``runs``."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in sorted(runs, key=lambda r: (method_key(r.method), sparse_key(r.sparse), r.seed)):
        if r.method != baseline:
            groups.setdefault((r.method, r.sparse), []).append(r)

    def gc(field: str):
        def f(st: Run, off: Run) -> float | None:
            x, y = getattr(st, field), getattr(off, field)
            return None if x is None or y is None else 100.0 * (x - y)
        return f

    def more_late(st: Run, off: Run) -> float | None:
        late, all_ = gc("gc_last50")(st, off), gc("gc_all")(st, off)
        return None if late is None or all_ is None else late - all_

    def dm_diff(st: Run, off: Run) -> float | None:
        x, y = dm(st), dm(off)
        return None if x is None or y is None else x - y

    out: list[Paired] = []
    for claim, value in (("a", gc("gc_all")), ("b", more_late), ("c", dm_diff)):
        for (method, sparse), group in groups.items():
            off = groups.get((method, "off"))
            if sparse == "off" or off is None:
                continue
            out.append(Paired(claim, method, sparse, _pair(group, off, value), "<0"))
    ew = groups.get(("ew", "off"))
    if ew is not None:
        for (method, sparse), group in groups.items():
            if sparse == "off" and method in GRADIENT_MANIPULATION:
                out.append(Paired("d", method, "off", _pair(group, ew, gc("gc_all")), ">=0"))
    return out


def format_number(x: float | None) -> str:
    """Two decimals, "—" for a missing value, never "-0.00"."""
    if x is None:
        return "—"
    text = f"{x:.2f}"
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


def format_mean_std(mean: float | None, std: float | None) -> str:
    """``mean ± std`` (the mean alone when there is no std)."""
    return format_number(mean) if std is None else f"{format_number(mean)} ± {format_number(std)}"


def _rule_text() -> str:
    return (f"Verdict rule (n paired seeds, t = mean / (std / √n)): fewer than {MIN_SEEDS} "
            f"paired seeds → inconclusive. Claims (a)-(c) say the difference is negative: "
            f"**holds** when every seed's difference is negative and |t| ≥ {T_MIN:g}; **does not "
            f"hold** when every seed's difference is positive and |t| ≥ {T_MIN:g}; else "
            f"inconclusive. Claim (d) says it is not negative: **holds** when no seed's "
            f"difference is negative; **does not hold** when every seed's is negative and "
            f"|t| ≥ {T_MIN:g}; else inconclusive. Only complete runs count (diverged and missing "
            f"runs are left out of the pairs).")


def format_reproduction(runs: Sequence[Run], dm: Callable[[Run], float | None], *,
                        baseline: str = "stl") -> str:
    """The "Does it reproduce?" section's body in Markdown: per claim, a verdict count and one
    row per method with the per-seed differences, mean ± std, the seeds that agree with the
    claim's sign and the verdict."""
    items = paired_claims(runs, dm, baseline=baseline)
    lines = ["Each claim of the ST paper, checked per method on paired per-seed differences "
             "(same method, same seed; with ST minus without unless said otherwise).",
             "", _rule_text(), ""]
    for claim, text in CLAIMS.items():
        rows = [p for p in items if p.claim == claim]
        lines.append(f"### ({claim}) {text}")
        lines.append("")
        if not rows:
            need = ("runs of `ew` and of a gradient-manipulation method without ST"
                    if claim == "d" else "runs of a method both without and with ST")
            lines += [f"Not checked: the grid has no {need}.", ""]
            continue
        counts = {v: sum(p.verdict == v for p in rows) for v in (HOLDS, NOT_HOLD, INCONCLUSIVE)}
        lines += [f"Difference: {_DIFF[claim]}. Verdicts: {counts[HOLDS]} hold, "
                  f"{counts[NOT_HOLD]} do not hold, {counts[INCONCLUSIVE]} inconclusive "
                  f"(of {len(rows)}).", "",
                  "| Method | ST | per-seed difference | mean ± std | seeds agreeing | verdict |",
                  "|---|---|---|---:|---:|---|"]
        for p in rows:
            per_seed = ", ".join(f"s{s}: {format_number(d)}" for s, d in p.diffs.items()) or \
                "no paired seed"
            mean, std = p.mean_std()
            ms = format_mean_std(mean, std)
            lines.append(f"| {display_name(p.method)} | {p.setting} | {per_seed} | {ms} | "
                         f"{p.agree}/{p.n} | {p.verdict} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
