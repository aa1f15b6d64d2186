"""``gradops compare``'s grid: one training run per (method, sparse setting, seed); the report
that follows is :func:`gradops.train.report.compare.run_grid`'s (``gradops.train.run_grid``).

Runs go to ``OUT/runs/<method>__<sparse>__s<seed>/`` (``=`` in the sparse setting becomes
``-``). ``stl`` (one model per task, the baseline of Δm) runs once per seed with sparse training
off, whether or not it is listed. The budgets:

- ``default``: the ST paper's comparison under its protocol for randomly initialised encoders
  (§4 and Appendix D.1 / Table 4: about 60% of the encoder trainable): ``ew`` (Joint Train),
  ``pcgrad``, ``cagrad``, ``graddrop``, ``mgda``, ``imtlg``, ``nashmtl``, ``famo``, each without
  and with sparse training (``fraction=0.6``), plus ``stl``, seeds 0, 1, 2, 8 epochs, on
  ``digits`` with the CNN at width 32 (big enough to fit the tasks with 60% of it trainable;
  docs/trainer.md), 51 runs, two at a time with one thread each. ``--sparse 0.3`` is the paper's
  pretrained-encoder setting;
- ``quick``: ``ew`` and ``pcgrad`` (+ ``stl``), one seed, one epoch on 512 training samples with
  a narrow CNN: seconds, for CI.

Options given explicitly (command line or config file) override the budget's. ``lrs`` (``compare
--lr 2e-3,8e-3``) trains every run at every rate (directories ``..__lr<rate>__s<seed>``); the report
then picks each (method, sparse)'s rate on validation Δm% (:mod:`gradops.train.report.lr`). A run
that diverges (:mod:`gradops.train.engine.divergence`) does not stop the grid: it is listed and
counted in the report, never averaged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ..config.errors import ConfigError
from ..config.method_options import check_method, trainer_methods
from ..config.schema import TrainConfig, canonical_sparse
from .run import run_training
from .rundir import LOCK_FILE, DirLock, probe_lock

__all__ = ["BUDGETS", "train_grid", "run_name", "DEFAULT_METHODS"]

DEFAULT_METHODS = ("ew", "pcgrad", "cagrad", "graddrop", "mgda", "imtlg", "nashmtl", "famo")

BUDGETS: dict[str, dict[str, Any]] = {
    "default": {"methods": DEFAULT_METHODS, "sparse": ("off", "fraction=0.6"),
                "seeds": (0, 1, 2), "jobs": 2,
                "config": {"epochs": 8, "width": 32, "threads": 1}},
    "quick": {"methods": ("ew", "pcgrad"), "sparse": ("off", "fraction=0.6"), "seeds": (0,),
              "jobs": 1, "config": {"epochs": 1, "train_limit": 512, "width": 4,
                                    "threads": 1}},
}


def run_name(method: str, sparse: str, seed: int, lr: float | None = None) -> str:
    """``pcgrad__fraction-0.3__s0``; with ``lr`` (a grid over learning rates)
    ``pcgrad__off__lr0.002__s0``.

    Args:
        method: the method's name.
        sparse: the sparse setting (``off``, ``fraction=0.3``...; ``=`` becomes ``-``).
        seed: the seed.
        lr: the learning rate, in a grid over learning rates; else None.

    Returns:
        The run directory's name.
    """
    rate = "" if lr is None else f"__lr{float(lr)!r}"
    return f"{method}__{sparse.replace('=', '-')}{rate}__s{seed}"


def _plan(methods: list[str], sparses: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    plan = []
    for seed in seeds:
        for m in methods:
            if m == "stl":
                continue
            for s in sparses:
                plan.append((m, s, seed))
        plan.append(("stl", "off", seed))
    return plan


def train_grid(base: TrainConfig, methods: list[str], sparses: list[str], seeds: list[int],
               out_dir: str | Path, **kw: Any) -> list[dict[str, Any]]:
    """:func:`_train_grid` holding ``out_dir``'s lock (:class:`.rundir.DirLock`) from before its
    first write until it returns: a second ``compare`` on the same directory is refused."""
    lock = DirLock(out_dir, "--out")
    with lock.holding():
        return _train_grid(base, methods, sparses, seeds, out_dir, _lock=lock, **kw)


def _train_grid(base: TrainConfig, methods: list[str], sparses: list[str], seeds: list[int],
                out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                progress: bool = True, jobs: int = 1, lrs: list[float] | None = None,
                finish: Callable[[Path], Any] | None = None, _lock: DirLock | None = None
                ) -> list[dict[str, Any]]:
    """Train every (method, sparse, seed) of the grid into ``out_dir/runs/``, then call
    ``finish(out_dir)`` (still holding the lock: the report). Returns the results.

    ``resume``: finished runs are kept, interrupted ones continue from their checkpoints.
    ``overwrite``: every run starts again. ``jobs``: runs trained at the same time, each in its
    own process (results do not depend on it: each run is deterministic for its ``threads``).
    ``lrs``: learning rates, each (method, sparse, seed) trained at each (default: ``base.lr``)."""
    if jobs < 1:
        raise ConfigError("--jobs", f"must be >= 1, got {jobs}")
    if not methods:
        raise ConfigError("--methods", "no method given", trainer_methods())
    methods = [check_method(m, "--methods") for m in methods]
    sparses = [canonical_sparse(s, "--sparse") for s in sparses]   # "0.6" -> "fraction=0.6"
    if not sparses:
        raise ConfigError("--sparse", "no setting given", ["off", "k=INT", "fraction=FLOAT"])
    if not seeds:
        raise ConfigError("--seeds", "no seed given")
    plan = _plan(list(dict.fromkeys(methods)), list(dict.fromkeys(sparses)),
                 list(dict.fromkeys(seeds)))
    rates = list(dict.fromkeys(lrs)) if lrs else [base.lr]
    for lr in rates:
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0 \
                or lr == float("inf"):
            raise ConfigError("--lr", f"each rate must be a finite number > 0, got {lr!r}")
    plan = [(m, s, seed, lr) for m, s, seed in plan for lr in rates]
    configs = [base.replace(method=m, sparse=s, seed=seed, lr=float(lr)).validate()
               for m, s, seed, lr in plan]
    named = len(rates) > 1      # one rate: the directory names stay method__sparse__s<seed>
    out = Path(out_dir)
    runs = out / "runs"
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    probe_lock(out, "--out")
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()) \
            and not (resume or overwrite):
        raise ConfigError("--out", f"{out} is not empty (holds another comparison or other "
                          "files); pass --resume to continue it or --overwrite to replace its runs")
    if _lock is not None:
        _lock.acquire()
    runs.mkdir(parents=True, exist_ok=True)
    todo = []
    for cfg in configs:
        d = runs / run_name(cfg.method, cfg.sparse, cfg.seed, cfg.lr if named else None)
        if resume and (d / "result.json").is_file():
            todo.append((cfg, d, "done"))
        elif resume and (d / "checkpoint.pt").is_file():
            todo.append((cfg, d, "resume"))
        else:
            todo.append((cfg, d, "fresh"))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), desc="compare", dynamic_ncols=True, file=sys.stderr)
    results: list[dict[str, Any] | None] = [None] * len(todo)

    def finished(i: int, res: dict[str, Any]) -> None:
        results[i] = res
        if bar is not None:
            bar.set_postfix_str(todo[i][1].name)
            bar.update(1)

    if jobs <= 1:
        for i, (cfg, d, how) in enumerate(todo):
            finished(i, _one(cfg, d, how, progress, False))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            futs = {ex.submit(_one, cfg, d, how, False, False): i
                    for i, (cfg, d, how) in enumerate(todo)}
            for f in as_completed(futs):
                finished(futs[f], f.result())
    if bar is not None:
        bar.close()
    if finish is not None:
        finish(out)
    return [r for r in results if r is not None]


def _one(cfg: TrainConfig, d: Path, how: str, progress: bool, quiet: bool) -> dict[str, Any]:
    """One run of the grid (also the worker function of ``jobs > 1``)."""
    if how == "done":
        return json.loads((d / "result.json").read_text())
    if how == "resume":
        return run_training(cfg, d, resume=True, progress=progress, quiet=quiet)
    return run_training(cfg, d, overwrite=True, progress=progress, quiet=quiet)
