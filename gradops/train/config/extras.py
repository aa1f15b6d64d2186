"""The values of Recon branching (``--recon``, ``--recon-topk``, ``--recon-init``) and the gradient
probes (``--probe``): their parsing, used by
:meth:`~gradops.train.config.schema.TrainConfig.validate` (see docs/recon.md). A Recon ranking is a
file check only (:func:`read_ranking`, :func:`top_layers`); the branching itself is
:mod:`gradops.train.models.branch`, the search :mod:`gradops.train.recon.search`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["RECON_INITS", "read_ranking", "top_layers", "parse_probe"]

#: How the task copies of a branched layer start (``--recon-init``).
RECON_INITS = ("reinit", "copy")


def read_ranking(path: str | Path, option: str = "--recon") -> list[dict[str, Any]]:
    """A ``ranking.json`` written by :func:`gradops.train.runs.recon_search.recon_search`
    (checked)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(option, f"no such file: {p}")
    try:
        ranking = json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(option, f"{p} is not valid JSON: {e}") from e
    if not isinstance(ranking, list) or not all(
            isinstance(r, dict) and isinstance(r.get("layer"), str) and "score" in r
            for r in ranking):
        raise ConfigError(option, f"{p} is not a ranking (a list of {{layer, score, params}})")
    return ranking


def top_layers(ranking: list[dict[str, Any]], k: int, option: str = "--recon-topk") -> list[str]:
    """The first ``k`` layer names of a ranking (``(root)`` written as ``""``)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(ranking):
        raise ConfigError(option, f"must be an integer in [1, {len(ranking)}] (the ranked "
                          f"layers), got {k!r}")
    return ["" if r["layer"] == "(root)" else r["layer"] for r in ranking[:k]]


def parse_probe(spec: str, option: str = "--probe") -> tuple[int, int] | None:
    """``"off"`` -> None; ``"every=5,samples=8"`` -> ``(5, 8)`` (either key may be left out:
    defaults 5 and 8). Raises :class:`ConfigError` naming ``option``."""
    v = str(spec).strip()
    if v in ("off", ""):
        return None
    out = {"every": 5, "samples": 8}
    for part in v.split(","):
        m = re.fullmatch(r"\s*(every|samples)=(\d+)\s*", part)
        if not m or int(m.group(2)) < 1:
            raise ConfigError(option, f"malformed value {spec!r} (every=INT>=1, samples=INT>=1)",
                              ["off", "every=5,samples=8"])
        out[m.group(1)] = int(m.group(2))
    if out["samples"] < 2:
        raise ConfigError(option, "samples must be >= 2 (inter-sample pairs)")
    return out["every"], out["samples"]
