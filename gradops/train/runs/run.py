"""One training run and its run directory.

``RUN_DIR`` holds ``config.toml`` (the resolved configuration), ``metrics.jsonl`` (one line per
epoch and split), ``conflicts.csv`` (one row per epoch), ``checkpoint.pt`` (written atomically
every ``checkpoint_every`` epochs and at the end) and, once the run is done, ``result.json``.
Everything the inputs can get wrong is checked before the directory is touched, so a run refused
for bad input loses nothing already written. The process that writes ``RUN_DIR`` holds its lock
(:class:`.rundir.DirLock`) for the run's life, and ``.gradops-manifest.json`` lists the files the
run writes (what ``--overwrite`` removes).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ... import __version__
from ..config.atomic import atomic_write_text
from ..config.errors import ConfigError
from ..config.io_errors import annotate
from ..config.schema import TrainConfig, read_toml, to_toml
from ..data import load_dataset
from ..engine.checkpoint import CHECKPOINT, load_checkpoint, restore_trainer, save_checkpoint
from ..engine.distributed import Dist, setup
from ..engine.divergence import Divergence, chance_levels, check_epoch, strict_json
from ..engine.stats import HIST_BINS
from ..engine.trainer import Trainer, resolve_device
from .extra_files import extra_files, write_extra_files
from .rundir import LOCK_FILE, DirLock, Manifest, probe_lock

__all__ = ["run_training", "RUN_FILES", "check_out_dir", "load_run_config"]

RUN_FILES = ("config.toml", "metrics.jsonl", "conflicts.csv", "result.json", CHECKPOINT)
#: The add-on files a run directory of an older gradops (no manifest) may hold.
LEGACY_ADDON_FILES = ("recon.json", "selective_groups.csv", "selective_affinity.csv",
                      "selective_groups.png", "selective_affinity.png", "probes.csv",
                      "probes.png")


def check_out_dir(out: Path, option: str = "--out", probe: bool = True) -> None:
    """Refuse an existing, non-empty directory (another run, or anything else; a directory in
    use by another process first, when ``probe``)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(option, f"{out} exists and is not a directory")
    if probe:
        probe_lock(out, option)
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        held = [f for f in RUN_FILES if (out / f).exists()] or \
            sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)[:3]
        raise ConfigError(option, f"{out} is not empty (holds {', '.join(held)}); pass "
                          f"--resume {out} to continue that run or --overwrite to replace it")


def load_run_config(run_dir: Path) -> TrainConfig:
    """The configuration saved in ``run_dir/config.toml`` (validated)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ConfigError("--resume", f"{run_dir} holds no run (no config.toml)")
    return TrainConfig.from_dict(read_toml(path), str(path)).validate()


def _truncate_jsonl(path: Path, epoch: int) -> None:
    """Keep the lines of epochs up to ``epoch`` (a line torn by a kill does not parse: dropped)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["epoch"] <= epoch:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _truncate_csv(path: Path, epoch: int) -> None:
    """Keep the header and the whole rows of epochs up to ``epoch``."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    if not lines:
        return
    width = len(lines[0].split(","))
    keep = lines[:1]
    for ln in lines[1:]:
        cells = ln.split(",")
        if len(cells) in (1, width) and cells[0].isdigit() and int(cells[0]) <= epoch:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _append(path: Path, text: str) -> None:
    with annotate(path), open(path, "a") as f:
        f.write(text)
        f.flush()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _summary(cfg: TrainConfig, result: dict[str, Any], out: Path) -> str:
    parts = []
    for task, ms in result["tasks"].items():
        parts.append(f"{task} " + " ".join(f"{k} {v:.4g}" for k, v in ms.items()))
    gc = ("gc n/a" if result["gc_all"] is None or result["gc_last50"] is None else
          f"gc {result['gc_all']:.3f} (last 50%: {result['gc_last50']:.3f})")
    return (f"gradops train: {cfg.method} sparse={cfg.sparse} seed={cfg.seed}: {cfg.epochs} "
            f"epochs in {result['time_s']:.1f} s; test: {'; '.join(parts)}; {gc} -> {out}")


def run_training(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False,
                 overwrite: bool = False, progress: bool = True, quiet: bool = False,
                 dist: Dist | None = None) -> dict[str, Any]:
    """Train one run into ``out_dir`` and return what ``result.json`` holds.

    The (main) process holds ``out_dir``'s lock from before it reads a checkpoint or writes a
    file until it returns; another process writing ``out_dir`` is refused (ConfigError).

    Args:
        config: the run's configuration (validated here); with ``resume`` the configuration
            saved in ``out_dir`` is used, except for ``device`` and ``threads`` (taken from
            ``config`` when it is given).
        out_dir: the run directory (created; must be empty unless ``resume`` / ``overwrite``).
        resume: continue from ``out_dir/checkpoint.pt`` (a finished run returns its result).
        overwrite: replace the run files in ``out_dir``.
        progress: show tqdm progress bars.
        quiet: print no summary line.
        dist: the process group description (default: from the environment, torchrun's).

    Returns:
        The run's result (what ``result.json`` holds: metrics, statistics, status).

    Raises:
        ConfigError: naming the option, for a bad configuration, a non-empty ``out_dir``
            without ``resume`` / ``overwrite``, or a run directory another process writes.
    """
    main = dist.main if dist is not None else int(os.environ.get("RANK", "0")) == 0
    lock = DirLock(out_dir, "--resume" if resume else "--out") if main else None
    with lock.holding() if lock is not None else contextlib.nullcontext():
        return _run_training(config, out_dir, resume=resume, overwrite=overwrite,
                             progress=progress, quiet=quiet, dist=dist, lock=lock)


def _run_training(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False,
                  overwrite: bool = False, progress: bool = True, quiet: bool = False,
                  dist: Dist | None = None, lock: DirLock | None = None) -> dict[str, Any]:
    """:func:`run_training`'s body (``lock``: the run directory's, taken here when main; the
    other arguments are :func:`run_training`'s)."""
    out = Path(out_dir)
    ckpt = None
    if resume:
        cfg = load_run_config(out)
        if lock is not None:
            lock.acquire()            # before the checkpoint is read: one writer at a time
        if config is not None:
            cfg = cfg.replace(device=config.device, threads=config.threads).validate()
        ckpt = load_checkpoint(out)
        if (out / "result.json").is_file() and ckpt["epoch"] >= cfg.epochs:
            if not quiet and lock is not None:
                print(f"gradops train: {out} is already finished ({ckpt['epoch']} of "
                      f"{cfg.epochs} epochs); its result is {out / 'result.json'}", flush=True)
            return json.loads((out / "result.json").read_text())
    else:
        cfg = config.validate()
        if not overwrite:
            check_out_dir(out)
        elif out.exists() and not out.is_dir():
            raise ConfigError("--out", f"{out} exists and is not a directory")
        else:
            probe_lock(out, "--out")
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.data, cfg.data_root or None, cfg.data_seed)
    dist = dist if dist is not None else setup(device)
    trainer = Trainer(cfg, data, device, dist, progress=progress)
    history: dict[str, Any] = {"gc": [], "hist": [0] * HIST_BINS, "time_s": 0.0,
                               "test": None, "nonconverged": 0}
    start = 1
    if ckpt is not None:
        restore_trainer(trainer, ckpt, out)
        history = ckpt["history"]
        start = ckpt["epoch"] + 1
    main = dist.main
    metrics_path, conf_path = out / "metrics.jsonl", out / "conflicts.csv"
    if main:
        if lock is not None and not lock.held:
            lock.acquire()
            if not overwrite:
                check_out_dir(out, probe=False)    # again, under the lock
        out.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(out)
        if ckpt is None:
            manifest.remove_files(fallback=RUN_FILES + LEGACY_ADDON_FILES)
        manifest.add(RUN_FILES + extra_files(trainer))
        if ckpt is None:
            header = (f"resolved configuration of a gradops train run (gradops "
                      f"{_version()}, torch {torch.__version__})")
            atomic_write_text(out / "config.toml", to_toml(cfg.to_dict(), header))
            cols = ["epoch", "incidence", "mean_cos", "gms"]
            if not trainer.stl:
                cols += [f"layer:{n}" for n in trainer.layers]
            atomic_write_text(conf_path, ",".join(cols) + "\n")
            atomic_write_text(metrics_path, "")
        else:
            _truncate_jsonl(metrics_path, start - 1)
            _truncate_csv(conf_path, start - 1)
            (out / "result.json").unlink(missing_ok=True)
    dist.barrier()

    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.epochs, initial=start - 1, desc=f"{cfg.method} {cfg.sparse} "
                   f"s{cfg.seed}", leave=False, dynamic_ncols=True, file=sys.stderr)
    t_run = time.perf_counter()
    # the divergence check's chance levels, from the val split's targets (read once)
    chance = chance_levels(trainer.tasks, trainer.splits["val"].targets) if main else {}
    diverged: Divergence | None = None
    stopped = False             # every process: the run diverged (decided by the main one)
    for epoch in range(start, cfg.epochs + 1):
        train_line = trainer.train_epoch(epoch)
        conf = train_line.pop("conflicts")
        history["nonconverged"] = history.get("nonconverged", 0) + train_line.pop("nonconverged")
        if main:
            lines = [train_line, trainer.evaluate(epoch, "val"), trainer.evaluate(epoch, "test")]
            history["test"] = lines[2]["metrics"]
            if conf is not None:
                history["gc"].append(conf["incidence"])
                history["hist"] = [a + b for a, b in zip(history["hist"], conf["hist"])]
            diverged, history["chance_streak"] = check_epoch(
                epoch, train_line, lines[1], chance, history.get("chance_streak", 0))
            _append(metrics_path, "".join(json.dumps(strict_json(ln), allow_nan=False) + "\n"
                                          for ln in lines))
            if conf is not None:
                row = [epoch, conf["incidence"], conf["mean_cos"], conf["gms"]]
                layers = conf["layers"]
                row += [None if layers is None else layers[n] for n in trainer.layers]
            else:
                row = [epoch]
            _append(conf_path, ",".join(_fmt(v) for v in row) + "\n")
            with annotate(out):
                write_extra_files(trainer, out)     # recon.json, selective_*, probes.*
            if diverged is None and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
                history["time_s"] += time.perf_counter() - t_run
                t_run = time.perf_counter()
                save_checkpoint(out, {"epoch": epoch, "trainer": trainer.state_dict(),
                                      "history": history, "config": cfg.to_dict()})
            if bar is not None:
                gc = "" if conf is None else f"{conf['incidence']:.3f}"
                bar.set_postfix_str(f"gc {gc} loss {sum(train_line['losses'].values()):.3f}")
                bar.update(1)
        dist.barrier()
        stopped = _any_process(dist, diverged is not None, trainer.device)
        if stopped:
            break               # a diverged run stops here (no checkpoint of its state)
    if bar is not None:
        bar.close()
    result = None
    if main:
        history["time_s"] += time.perf_counter() - t_run
        result = _result(cfg, trainer, history, warn=diverged is None)
        if diverged is not None:
            result["status"] = "diverged"
            result["divergence"] = diverged.to_dict()
        result = strict_json(result)
        atomic_write_text(out / "result.json",
                          json.dumps(result, indent=1, allow_nan=False) + "\n")
        if diverged is not None:
            print(f"{diverged.message()} -> {out}", file=sys.stderr, flush=True)
        elif not quiet:
            from tqdm import tqdm
            tqdm.write(_summary(cfg, result, out), file=sys.stdout)
            sys.stdout.flush()
    dist.barrier()
    if result is not None:
        return result
    return {"status": "diverged"} if stopped else {}    # the other processes of a torchrun


def _result(cfg: TrainConfig, trainer: Trainer, history: dict[str, Any], *, warn: bool = True
            ) -> dict[str, Any]:
    gcs = history["gc"]
    last = gcs[len(gcs) // 2:] if gcs else []      # the last ceil(E/2) epochs
    hist = None
    if gcs:
        hist = {"edges": [-1.0 + 2.0 * i / HIST_BINS for i in range(HIST_BINS + 1)],
                "counts": [int(c) for c in history["hist"]]}
    for name, ms in (history["test"] or {}).items():
        for k, v in ms.items():
            if warn and not math.isfinite(v):
                print(f"gradops train: warning: test {name} {k} is {v}", file=sys.stderr)
    return {"status": "ok", "method": cfg.method, "sparse": cfg.sparse, "seed": cfg.seed,
            "lr": cfg.lr, "data": cfg.data, "epochs": cfg.epochs, "backbone": cfg.backbone,
            "sparse_fraction": trainer.sparse_fraction,
            "tasks": history["test"],
            "directions": {t.name: dict(t.directions) for t in trainer.tasks},
            "gc_all": _mean(gcs), "gc_last50": _mean(last), "cosine_hist": hist,
            "nonconverged_steps": history.get("nonconverged", 0), "time_s": history["time_s"]}


def _any_process(dist: Dist, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process (the main process decides a divergence; every
    process must stop with it). One reduction per epoch under torchrun, none otherwise."""
    if not dist.enabled:
        return flag
    import torch.distributed as tdist
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t)
    return bool(t.item() > 0)


def _version() -> str:
    return __version__
