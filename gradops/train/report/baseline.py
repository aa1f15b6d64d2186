"""The baseline Δm% is measured against (:func:`gradops.train.report.build.stl_baseline`: our STL
runs; :mod:`gradops.train.report.published_stl`: published STL values)."""
from __future__ import annotations

import dataclasses

__all__ = ["Baseline"]


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The STL values Δm% is measured against: the mean over the seeds of the chosen runs."""
    method: str
    sparse: str
    seeds: list[int]
    metrics: dict[str, dict[str, float]]
    directions: dict[str, dict[str, str]]

    def describe(self) -> str:
        seeds = ", ".join(map(str, self.seeds))
        return (f"`{self.method}` runs with sparse `{self.sparse}`, mean over seed(s) {seeds}"
                + ("" if self.sparse == "off" else " (no run with sparse `off` exists)"))
