"""The directory of Recon's layer search (``gradops recon search --out DIR``): ``ranking.json``
(layers sorted by score, descending; ties keep the network's order), ``search.json`` (the
search's parameters, time and configuration) and ``scores.png``, written while holding the
directory's lock (:class:`~gradops.train.runs.rundir.DirLock`). The search itself is
:func:`gradops.train.recon.search.search_layers`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config.atomic import atomic_write_text
from ..config.errors import ConfigError
from ..config.schema import TrainConfig
from ..engine.trainer import resolve_device
from ..recon.search import search_layers
from .rundir import LOCK_FILE, DirLock, probe_lock

__all__ = ["recon_search", "check_empty_dir"]


def check_empty_dir(out: Path, option: str = "--out", overwrite: bool = False,
                    probe: bool = True) -> None:
    """Refuse a path that is a file, a directory another process writes, or a non-empty
    directory unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ConfigError(option, f"{out} exists and is not a directory")
    if probe:
        probe_lock(out, option)
    if not overwrite and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ConfigError(option, f"{out} is not empty; pass --overwrite to replace its files")


def recon_search(cfg: TrainConfig, iters: int, S: float, out_dir: str | Path, *,
                 overwrite: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """Run Recon's search (:func:`~gradops.train.recon.search.search_layers`) into ``out_dir``
    (module docstring); returns the ranking written to ``out_dir/ranking.json``. Holds
    ``out_dir``'s lock while it writes there."""
    lock = DirLock(out_dir, "--out")
    with lock.holding():
        return _recon_search(cfg, iters, S, out_dir, overwrite=overwrite, progress=progress,
                             lock=lock)


def _recon_search(cfg: TrainConfig, iters: int, S: float, out_dir: str | Path, *,
                  overwrite: bool = False, progress: bool = False, lock: Any = None
                  ) -> list[dict[str, Any]]:
    cfg = cfg.validate()
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError("--iters", f"must be an integer >= 1, got {iters!r}")
    if not -1.0 < float(S) <= 0.0:
        raise ConfigError("--S", f"must be in (-1, 0], got {S}")
    if cfg.method == "stl":
        raise ConfigError("--method", "stl has no shared layers to search", ["any other method"])
    if not cfg.stats:
        raise ConfigError("--stats", "the search needs the per-task gradients (--stats)")
    out = Path(out_dir)
    check_empty_dir(out, overwrite=overwrite)
    if lock is not None:
        lock.acquire()
        check_empty_dir(out, overwrite=overwrite, probe=False)     # again, under the lock
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    found = search_layers(cfg, iters, S, device, progress=progress)
    ranking = found["ranking"]
    atomic_write_text(out / "ranking.json", json.dumps(ranking, indent=1) + "\n")
    T = len(found["tasks"])
    meta = {"iters": iters, "S": float(S), "tasks": found["tasks"],
            "pairs_per_step": T * (T - 1) // 2,
            "layers_in_network_order": found["layers"], "time_s": found["time_s"],
            "config": cfg.to_dict()}
    atomic_write_text(out / "search.json", json.dumps(meta, indent=1) + "\n")
    from ..recon.plots import plot_scores   # matplotlib: optional
    plot_scores(found["layers"], found["counts"], iters * meta["pairs_per_step"], float(S),
                out / "scores.png")
    return ranking
