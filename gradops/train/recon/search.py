"""Recon's layer search and the before/after conflict comparison (Shi et al., "Recon: Reducing
Conflicting Gradients from the Root for Multi-Task Learning", ICLR 2023, Algorithm 1, Table 6).

:func:`search_layers` trains the unbranched model of a trainer configuration for ``iters``
iterations with its method (any method but ``stl``), accumulates each layer's S-conflict count
on the device from the per-layer Grams the optimizer computes anyway (``stats=True``: one pass
over the per-task gradients, no host sync per step) and ranks the layers by score (descending;
ties keep the network's order); :func:`gradops.train.runs.recon_search.recon_search` writes the
search's directory (``ranking.json``, ``scores.png``, ``search.json``). The LR schedule is not
stepped during the search (it is a few hundred iterations at ``--lr``).

The optimizers are the trainer's (:mod:`gradops.train.engine.optimizers`): ``--optim`` and the
method's options apply to the search and to :func:`conflict_table` alike.

:func:`conflict_table` trains the unbranched and the branched model (top-``K`` layers of a
ranking task-specific) from the same seed for the same iterations and counts the pairwise
cosines of the task gradients, in Recon's Table 6 bins, on the layers that stay shared
(``before_remaining`` / ``after_remaining``) and, for the unbranched model, on all shared
layers (``before_all``, the paper's joint-training column).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from ...weighting import get_method, method_names
from ..config.errors import ConfigError
from ..config.extras import read_ranking, top_layers
from ..config.schema import TrainConfig
from ..data import load_dataset
from ..engine.distributed import Dist
from ..engine.optimizers import inner_optimizer, mtl_optimizer
from ..engine.stats import layer_index
from ..engine.trainer import Trainer, resolve_device
from ..models.branch import branch_model
from ..models.build import build_model
from .scores import TABLE6_BINS, CosineBins, LayerScores

__all__ = ["search_layers", "read_ranking", "top_layers", "conflict_table",
           "conflict_table_markdown", "default_iters", "encoder_layers"]


def default_iters(cfg: TrainConfig) -> int:
    """The iterations of ``cfg.epochs`` epochs over the training split (``--train-limit``
    applied) at ``cfg.batch_size``: Recon scores the layers over the whole training of the base
    model, and its Table 6 counts the cosines over a whole training."""
    data = load_dataset(cfg.data, cfg.data_root or None, cfg.data_seed)
    n = len(data.splits["train"])
    if cfg.train_limit:
        n = min(n, cfg.train_limit)
    return max(1, cfg.epochs * (n // cfg.batch_size))


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


def search_layers(cfg: TrainConfig, iters: int, S: float, device: torch.device,
                  progress: bool = False) -> dict[str, Any]:
    """Recon's search (module docstring) for a validated ``cfg`` on ``device``: trains the
    unbranched model for ``iters`` steps, counting each layer's S-conflicts through a step
    callback of the :class:`~gradops.train.engine.trainer.Trainer`. Returns ``ranking`` (layers
    by score, descending; ties in the network's order), ``layers`` (the network's order),
    ``counts`` (in that order), ``tasks`` and ``time_s``. The run directory is
    :func:`gradops.train.runs.recon_search.recon_search`'s."""
    data = load_dataset(cfg.data, cfg.data_root or None, cfg.data_seed)
    trainer = Trainer(cfg, data, device, Dist(), progress=False)
    if len(trainer.tasks) < 2:
        raise ConfigError("--data", "the search needs at least two tasks")
    enc = trainer.net.encoder
    shared = [p for p in enc.parameters() if p.requires_grad]
    layers, index = layer_index(enc, shared)
    scores = LayerScores(index, len(layers), float(S), device)

    def add(info: Any) -> None:        # after the trainer's own statistics
        Gl = getattr(info, "layer_gram", None)
        if Gl is not None:
            scores.add(Gl)

    trainer.add_step_callback(add)
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
            trainer.step(*tr.batch(bi))   # the split's own transform (augmentation, dtype)
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
    return {"ranking": ranking, "layers": layers, "counts": counts,
            "tasks": [t.name for t in trainer.tasks], "time_s": seconds}


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, shared: list[torch.Tensor]):
    """The trainer's optimizers (:mod:`gradops.train.engine.optimizers`: ``--optim`` and the
    method's options) over ``model``, the statistics on (the per-layer Grams)."""
    kinds = ("sum", "gram", "layer", "elementwise")
    if get_method(cfg.method).kind not in kinds:
        raise ConfigError("--method", f"the conflict comparison takes a gradient method, "
                          f"got {cfg.method!r}", method_names(kinds))
    inner = inner_optimizer(cfg, list(model.parameters()))
    return mtl_optimizer(cfg.replace(stats=True), inner, shared, None, None, None)


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
