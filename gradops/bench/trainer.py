"""Suite ``trainer``: the bundled trainer's epoch time per method over ``ew``'s, on the default
CNN and the ``digits`` data set, and where an epoch's time goes.

For each method one :class:`gradops.train.engine.trainer.Trainer` is built; epochs are timed
interleaved, round by round (medians over ``--rounds``, after one warm-up epoch each). Each epoch is
split into: forward + backward (the model's forwards, the losses, ``MTLOptimizer.backward`` with the
method's per-task passes, Gram, solve and combine; FAMO's extra no-grad forward), the optimizer
step, and everything else (batch indexing, predictions kept for the train metrics, the conflict
statistics accumulated on device, the once-per-epoch read of the statistics and the metrics, the LR
schedule). Evaluation is not part of the epoch here. ``ew`` runs with ``stats=True`` (per-task
gradients for the conflict statistics), as the trainer does by default.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any, Callable

import torch
from torch import nn

from ..weighting import method_names
from ..train.config.schema import TrainConfig
from ..train.data import load_dataset
from ..train.engine.distributed import Dist
from ..train.engine.trainer import Trainer
from .timing import sync

__all__ = ["main", "DEFAULT_METHODS"]

DEFAULT_METHODS = method_names(("sum", "gram", "layer", "elementwise", "loss")) + ("stl",)
"""Every registered method the trainer runs, and single-task learning (the selective mode's
group updates are not timed)."""


class _Clock:
    """Seconds spent in wrapped calls; nested wrapped calls count once (the outermost)."""

    def __init__(self, device: torch.device):
        self.device, self.depth, self.total = device, 0, 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a, **k):
            if self.depth:
                return fn(*a, **k)
            sync(self.device)
            t0 = time.perf_counter()
            self.depth += 1
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
                sync(self.device)
                self.total += time.perf_counter() - t0
        return timed


class _TimedTrainer(Trainer):
    """The Trainer with its forward and losses (:meth:`~Trainer.losses`, every call of the
    step: FAMO's extra forward and selective's too) timed by ``clock``."""

    clock: _Clock

    def losses(self, module: nn.Module, x: torch.Tensor, ys: dict[str, torch.Tensor]):
        return self.clock.wrap(super().losses)(module, x, ys)


def _trainer(method: str, quick: bool, device: torch.device, clock: _Clock) -> _TimedTrainer:
    cfg = TrainConfig(method=method, epochs=100, train_limit=512 if quick else 0,
                      device=device.type).validate()
    tr = _TimedTrainer(cfg, load_dataset(cfg.data), device, Dist())
    tr.clock = clock
    return tr


def main(args: argparse.Namespace) -> int:
    device = torch.device(getattr(args, "device", "cpu") or "cpu")
    quick = bool(getattr(args, "quick", False))
    methods = (list(DEFAULT_METHODS) if not getattr(args, "methods", None) else
               [m.strip() for m in args.methods.split(",") if m.strip()])
    if "ew" not in methods:
        methods = ["ew"] + methods
    rounds = max(1, int(getattr(args, "rounds", 5) or 5))
    if quick:
        rounds = min(rounds, 2)
    trainers, fb, st = {}, {}, {}
    for m in methods:
        fb[m], st[m] = _Clock(device), _Clock(device)
        tr = _trainer(m, quick, device, fb[m])
        if hasattr(tr.opt, "backward"):
            tr.opt.backward = fb[m].wrap(tr.opt.backward)
        tr.opt.step = st[m].wrap(tr.opt.step)
        trainers[m] = tr
    real_backward = torch.autograd.backward
    times: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    try:
        for r in range(rounds + 1):                  # round 0 warms up
            for m in methods:
                tr = trainers[m]
                torch.autograd.backward = fb[m].wrap(real_backward)   # stl's summed backward
                fb[m].total = st[m].total = 0.0
                sync(device)
                t0 = time.perf_counter()
                with warnings.catch_warnings():   # the timer around opt.step puzzles LR schedulers
                    warnings.filterwarnings("ignore", message=".*optimizer.step.*overridden")
                    tr.train_epoch(r + 1)
                sync(device)
                total = time.perf_counter() - t0
                torch.autograd.backward = real_backward
                if r:
                    times[m].append((total, fb[m].total, st[m].total))
    finally:
        torch.autograd.backward = real_backward
    rows = []
    ew = statistics.median(t for t, _, _ in times["ew"])
    steps = len(trainers["ew"].sampler) // trainers["ew"].local_batch
    for m in methods:
        tot = statistics.median(t for t, _, _ in times[m])
        fwd = statistics.median(f / t for t, f, _ in times[m])
        stp = statistics.median(s / t for t, _, s in times[m])
        rows.append({"method": m, "epoch_s": round(tot, 4), "x_ew": round(tot / ew, 3),
                     "fwd_bwd_share": round(fwd, 3), "step_share": round(stp, 3),
                     "other_share": round(1 - fwd - stp, 3), "steps": steps,
                     "rounds": rounds, "quick": quick})
    head = "| method | epoch s | x ew | forward+backward | optimizer step | other |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['epoch_s']:.3f} | {r['x_ew']:.2f}x | "
                     f"{100 * r['fwd_bwd_share']:.1f}% | {100 * r['step_share']:.1f}% | "
                     f"{100 * r['other_share']:.1f}% |")
    notes = [f"gradops bench --suite trainer: digits, default CNN, {steps} steps per epoch, "
             f"device {device}, {torch.get_num_threads()} threads, median of {rounds} epochs; "
             "other = batch indexing, train predictions, statistics, once-per-epoch reads"]
    from .report import emit
    return emit("\n".join(lines), notes, rows, getattr(args, "csv", None), device,
                bool(getattr(args, "append", False)))
