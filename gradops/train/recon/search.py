"""Recon's layer search and the before/after conflict comparison (Shi et al., "Recon: Reducing
Conflicting Gradients from the Root for Multi-Task Learning", ICLR 2023, Algorithm 1, Table 6).

:func:`recon_search` trains the unbranched model of a trainer configuration for ``iters``
iterations with its method (any method but ``stl``), accumulates each layer's S-conflict count
on the device from the per-layer Grams the optimizer computes anyway (``stats=True``: one pass
over the per-task gradients, no host sync per step) and writes ``ranking.json`` (layers sorted
by score, descending; ties keep the network's order), ``scores.png`` and ``search.json``. The LR
schedule is not stepped during the search (it is a few hundred iterations at ``--lr``).

:func:`conflict_table` trains the unbranched and the branched model (top-``K`` layers of a
ranking task-specific) from the same seed for the same iterations and counts the pairwise
cosines of the task gradients, in Recon's Table 6 bins, on the layers that stay shared
(``before_remaining`` / ``after_remaining``) and, for the unbranched model, on all shared
layers (``before_all``, the paper's joint-training column).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ...weighting import get_method, method_names
from ..config.method_options import method_options
from ..config.schema import TrainConfig
from ..data import load_dataset
from ..engine.distributed import Dist
from ..config.errors import ConfigError
from ..models.dense import build_model
from ..engine.stats import layer_index
from ..models.branch import branch_model
from .scores import TABLE6_BINS, CosineBins, LayerScores

__all__ = ["recon_search", "read_ranking", "top_layers", "conflict_table",
           "conflict_table_markdown", "check_empty_dir", "default_iters", "encoder_layers"]


def default_iters(cfg: TrainConfig) -> int:
    """The iterations of ``cfg.epochs`` epochs over the training split (``--train-limit``
    applied) at ``cfg.batch_size``: Recon scores the layers over the whole training of the base
    model, and its Table 6 counts the cosines over a whole training."""
    data = load_dataset(cfg.data, cfg.data_root or None, cfg.data_seed)
    n = len(data.splits["train"])
    if cfg.train_limit:
        n = min(n, cfg.train_limit)
    return max(1, cfg.epochs * (n // cfg.batch_size))


def check_empty_dir(out: Path, option: str = "--out", overwrite: bool = False,
                    probe: bool = True) -> None:
    """Refuse a path that is a file, a directory another process writes, or a non-empty
    directory unless ``overwrite``."""
    from ..runs.rundir import LOCK_FILE, probe_lock
    if out.exists() and not out.is_dir():
        raise ConfigError(option, f"{out} exists and is not a directory")
    if probe:
        probe_lock(out, option)
    if not overwrite and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ConfigError(option, f"{out} is not empty; pass --overwrite to replace its files")


def encoder_layers(cfg: TrainConfig) -> list[str]:
    """The layers of the trainer's encoder for ``cfg`` (those a search ranks)."""
    data = load_dataset(cfg.data, cfg.data_root or None, cfg.data_seed)
    model = build_model(cfg.backbone, data.input_shape, cfg.width, data.tasks,
                        cfg.weights or None)
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    return layer_index(model.encoder, shared)[0]


def _layer_params(module: torch.nn.Module, names: list[str]) -> dict[str, int]:
    mods = dict(module.named_modules())
    return {n: sum(p.numel() for p in mods["" if n == "(root)" else n].parameters(recurse=False))
            for n in names}


def recon_search(cfg: TrainConfig, iters: int, S: float, out_dir: str | Path, *,
                 overwrite: bool = False, progress: bool = False) -> list[dict[str, Any]]:
    """Run Recon's search (module docstring); returns the ranking written to
    ``out_dir/ranking.json``. Holds ``out_dir``'s lock (:class:`~gradops.train.runs.rundir.DirLock`)
    while it writes there."""
    from ..runs.rundir import DirLock
    lock = DirLock(out_dir, "--out")
    with lock.holding():
        return _recon_search(cfg, iters, S, out_dir, overwrite=overwrite, progress=progress,
                             lock=lock)


def _recon_search(cfg: TrainConfig, iters: int, S: float, out_dir: str | Path, *,
                  overwrite: bool = False, progress: bool = False, lock: Any = None
                  ) -> list[dict[str, Any]]:
    from ..engine.trainer import Trainer, resolve_device
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
    data = load_dataset(cfg.data, cfg.data_root or None, cfg.data_seed)
    trainer = Trainer(cfg, data, device, Dist(), progress=False)
    if len(trainer.tasks) < 2:
        raise ConfigError("--data", "the search needs at least two tasks")
    enc = trainer.net.encoder
    shared = [p for p in enc.parameters() if p.requires_grad]
    layers, index = layer_index(enc, shared)
    scores = LayerScores(index, len(layers), float(S), device)
    trainer_add = trainer.stats.add

    def add(info: Any) -> None:
        Gl = getattr(info, "layer_gram", None)
        if Gl is not None:
            scores.add(Gl)
        trainer_add(info)

    trainer.stats.add = add             # the trainer's own statistics still accumulate
    t0 = time.perf_counter()
    step, epoch = 0, 0
    tr = trainer.splits["train"]
    b = trainer.local_batch
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=iters, desc="recon search", leave=False, dynamic_ncols=True)
    trainer.model.train()
    while step < iters:
        epoch += 1
        trainer.sampler.set_epoch(epoch)
        idx = torch.tensor(list(iter(trainer.sampler)), dtype=torch.long, device=device)
        for i in range(len(idx) // b):
            if step >= iters:
                break
            bi = idx[i * b:(i + 1) * b]
            trainer._step(*tr.batch(bi))   # the split's own transform (augmentation, dtype)
            step += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    counts = scores.counts.tolist()     # the one host read of the search
    seconds = time.perf_counter() - t0
    if scores.steps != iters:
        raise RuntimeError(f"recon_search: {scores.steps} of {iters} steps had per-layer Grams")
    nparams = _layer_params(enc, layers)
    order = sorted(range(len(layers)), key=lambda i: -counts[i])
    ranking = [{"layer": layers[i], "score": int(counts[i]), "params": nparams[layers[i]]}
               for i in order]
    from ..engine.checkpoint import atomic_write_text
    atomic_write_text(out / "ranking.json", json.dumps(ranking, indent=1) + "\n")
    meta = {"iters": iters, "S": float(S), "tasks": [t.name for t in trainer.tasks],
            "pairs_per_step": len(trainer.tasks) * (len(trainer.tasks) - 1) // 2,
            "layers_in_network_order": layers, "time_s": seconds,
            "config": cfg.to_dict()}
    atomic_write_text(out / "search.json", json.dumps(meta, indent=1) + "\n")
    from .plots import plot_scores
    plot_scores(layers, counts, iters * meta["pairs_per_step"], float(S), out / "scores.png")
    return ranking


def read_ranking(path: str | Path, option: str = "--recon") -> list[dict[str, Any]]:
    """A ``ranking.json`` written by :func:`recon_search` (checked)."""
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


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, shared: list[torch.Tensor]):
    from ...optim import MTLOptimizer
    kinds = ("sum", "gram", "layer", "elementwise")
    if get_method(cfg.method).kind not in kinds:
        raise ConfigError("--method", f"the conflict comparison takes a gradient method, "
                          f"got {cfg.method!r}", method_names(kinds))
    inner = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return MTLOptimizer(inner, method=cfg.method, method_options=method_options(cfg),
                        shared=shared, stats=True)


def _run_bins(cfg: TrainConfig, data, model: torch.nn.Module, base: torch.nn.Module,
              shared: list[torch.Tensor], remaining: set[str], iters: int,
              device: torch.device) -> dict[str, CosineBins]:
    tasks = data.tasks
    layers, index = layer_index(base, shared)
    scores = LayerScores(index, len(layers), 0.0, device)
    keep = torch.tensor([n in remaining for n in layers], device=device)
    bins = {"all": CosineBins(len(tasks), device), "remaining": CosineBins(len(tasks), device)}
    opt = _optimizer(cfg, model, shared)
    tr = data.splits["train"]
    g = torch.Generator().manual_seed(cfg.seed)
    n, b = len(tr), cfg.batch_size
    step = 0
    model.train()
    while step < iters:
        perm = torch.randperm(n, generator=g)
        for i in range(n // b):
            if step >= iters:
                break
            x, ys = tr.batch(perm[i * b:(i + 1) * b], g)   # the split's transform, then device
            x, ys = x.to(device), {k: v.to(device) for k, v in ys.items()}
            outs = model(x)
            losses = [t.loss(outs[t.name], ys[t.name]) for t in tasks]
            opt.zero_grad(set_to_none=True)
            info = opt.backward(losses)
            opt.step()
            Gl = scores.layer_grams(info.layer_gram.detach())
            bins["all"].add(Gl.sum(0))
            bins["remaining"].add(Gl[keep].sum(0))
            step += 1
    return bins


def conflict_table(cfg: TrainConfig, ranking: list[dict[str, Any]], topk: int, iters: int,
                   init: str = "reinit") -> dict[str, Any]:
    """Before/after distribution of pairwise cosines (module docstring). Percentages per bin of
    :data:`~gradops.train.recon.scores.TABLE6_BINS`; ``reduction_*``: Recon's "Reduction", the
    percentage by which the share of pairs with ``cos < -0.01`` falls."""
    from ..engine.trainer import resolve_device
    cfg = cfg.validate()
    branched = top_layers(ranking, topk)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError("--iters", f"must be an integer >= 1, got {iters!r}")
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_dataset(cfg.data, cfg.data_root or None, cfg.data_seed)
    if cfg.train_limit:
        data.splits["train"] = data.splits["train"].subset(cfg.train_limit)
    shape = data.input_shape

    def build() -> torch.nn.Module:     # the trainer's network: per-image or dense
        torch.manual_seed(cfg.seed)
        return build_model(cfg.backbone, shape, cfg.width, data.tasks,
                           cfg.weights or None).to(device)

    try:       # the ranking must fit this encoder (checked before any training)
        branch_model(build(), branched, init=init)
    except ValueError as e:
        raise ConfigError("--ranking", f"does not fit this encoder: {e}") from e
    m0 = build()
    names0, _ = layer_index(m0.encoder, list(m0.encoder.parameters()))
    remaining = {n for n in names0 if n not in {("(root)" if b == "" else b) for b in branched}}
    t0 = time.perf_counter()
    before = _run_bins(cfg, data, m0, m0.encoder, list(m0.encoder.parameters()), remaining,
                       iters, device)
    m1 = branch_model(build(), branched, init=init).to(device)
    after = _run_bins(cfg, data, m1, m1.encoder.base, m1.shared_parameters(), remaining,
                      iters, device)
    seconds = time.perf_counter() - t0
    cols = {"before_all": before["all"].percentages(),
            "before_remaining": before["remaining"].percentages(),
            "after_remaining": after["remaining"].percentages()}
    severe = [label for label, lo, hi in TABLE6_BINS if hi is not None and hi <= -0.01]

    def share(col: dict[str, float]) -> float:
        return sum(col[s] for s in severe)

    def reduction(a: float, b: float) -> float | None:     # None: no conflicting pair before
        return 100.0 * (a - b) / a if a else None

    return {"bins": [label for label, _, _ in TABLE6_BINS], "columns": cols,
            "severe_share": {k: share(v) for k, v in cols.items()},
            "reduction_remaining": reduction(share(cols["before_remaining"]),
                                             share(cols["after_remaining"])),
            "reduction_all": reduction(share(cols["before_all"]), share(cols["after_remaining"])),
            "branched": branched, "remaining_layers": sorted(remaining), "iters": iters,
            "method": cfg.method, "init": init, "time_s": seconds}


def conflict_table_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown (Recon's Table 6 layout: bins as rows, percentages of pairs)."""
    cols = list(table["columns"])
    lines = ["| cos(phi_ij) | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label in table["bins"]:
        lines.append(f"| {label} | " + " | ".join(f"{table['columns'][c][label]:.2f}"
                                                  for c in cols) + " |")
    lines.append("| cos < -0.01 | " + " | ".join(f"{table['severe_share'][c]:.2f}"
                                                 for c in cols) + " |")
    lines.append("")
    def pct(x: float | None) -> str:
        return "— (no such pair before)" if x is None else f"{x:.1f}%"

    lines.append(f"Reduction of the share with cos < -0.01: {pct(table['reduction_remaining'])} "
                 f"against the same layers before branching, {pct(table['reduction_all'])} "
                 "against all shared layers before branching (Recon's Table 6 compares the "
                 "latter).")
    return "\n".join(lines) + "\n"
