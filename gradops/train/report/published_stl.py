"""Published single-task (STL) results shipped with gradops, a baseline for Δm% when no STL run
was made (``gradops compare --baseline published``).

The values are those of single-task SegNet models trained with MTAN's protocol (Liu et al.,
"End-to-End Multi-Task Learning with Attention", CVPR 2019) as Nash-MTL (Navon et al., "Multi-Task
Learning as a Bargaining Game", ICML 2022, Tables 2 and 3) and FAMO (Liu et al., "FAMO: Fast
Adaptive Multitask Optimization", NeurIPS 2023) report them and compute their Δm% against:

- NYUv2 (13-class segmentation, depth, surface normals; 200 epochs);
- CityScapes (7-class segmentation, inverse depth; the relative error of the disparity is
  printed unscaled, hence its size).

Fractions are stored as fractions (the papers print mIoU, pixel accuracy and the "within"
columns in percent). Two differences to keep in mind when comparing with the papers' Δm%: the
papers average the relative differences over all metrics at once (9 on NYUv2), while
:func:`gradops.train.report.delta_m.delta_m` averages within each task first; and the papers' depth
errors are per-batch averages, ours are pooled over the split (:mod:`gradops.train.tasks.dense`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .baseline import Baseline

__all__ = ["PUBLISHED_STL", "PublishedBaseline", "published_baseline"]

_SOURCE = ("single-task SegNet (MTAN's protocol) as reported by Nash-MTL (Navon et al., 2022) "
           "and FAMO (Liu et al., 2023)")

PUBLISHED_STL: dict[str, dict[str, dict[str, float]]] = {
    "nyuv2": {
        "segmentation": {"miou": 0.3830, "pixel_acc": 0.6376},
        "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
        "normal": {"mean": 25.01, "median": 19.21, "within_11_25": 0.3014,
                   "within_22_5": 0.5720, "within_30": 0.6915},
    },
    "cityscapes": {
        "segmentation": {"miou": 0.7401, "pixel_acc": 0.9316},
        "depth": {"abs_err": 0.0125, "rel_err": 27.77},
    },
}


@dataclasses.dataclass(frozen=True)
class PublishedBaseline(Baseline):
    """A :class:`~gradops.train.report.baseline.Baseline` of published values (no run of ours)."""

    data: str = ""
    source: str = _SOURCE

    def describe(self) -> str:
        return (f"the published STL values of {self.data} ({self.source}; shipped in "
                "gradops.train.report.published_stl). Their Δm% averages over all metrics at once, "
                "ours within each task first, so the numbers are close but not identical")


def published_baseline(runs: Sequence) -> PublishedBaseline | None:
    """The published baseline for the data set of ``runs`` (None when there is no run).

    Raises:
        ValueError: runs of several data sets, a data set without published values, or runs
            whose tasks or metrics differ from the published table's.
    """
    if not runs:
        return None
    data = sorted({r.data for r in runs})
    if len(data) != 1:
        raise ValueError(f"baseline: published values need runs of one data set, got {data}")
    name = data[0]
    if name not in PUBLISHED_STL:
        raise ValueError(f"baseline: no published STL values for data set {name!r}; valid: "
                         f"{', '.join(PUBLISHED_STL)} (or use the stl runs: --baseline stl)")
    table = PUBLISHED_STL[name]
    directions = runs[0].directions
    if {t: set(m) for t, m in directions.items()} != {t: set(m) for t, m in table.items()}:
        want = {t: list(m) for t, m in table.items()}
        raise ValueError(f"baseline: the runs' tasks and metrics {directions} do not match the "
                         f"published table of {name!r} ({want})")
    return PublishedBaseline(method="published", sparse="off", seeds=[],
                             metrics={t: dict(m) for t, m in table.items()},
                             directions={t: dict(d) for t, d in directions.items()}, data=name)
