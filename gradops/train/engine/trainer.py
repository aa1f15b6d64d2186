"""The epoch loop: model, optimizers, schedule, AMP, sparse training, statistics, evaluation.

One :class:`Trainer` holds everything a run's state consists of (model, inner optimizer wrapped
in :class:`gradops.optim.MTLOptimizer`, LR schedule, the loss-level method, the GradScaler, the
RNG states) and saves / loads it as one checkpoint dictionary, so that a resumed run continues
bit-exactly on CPU. The data order of epoch ``e`` is a function of ``(seed, e)`` only
(``DistributedSampler.set_epoch``), so it needs no state.

Per step: forward under autocast (``--amp``), the T task losses, the loss-level method's terms
(``uw`` / ``dwa`` / ``famo``), ``MTLOptimizer.backward`` (per-task gradients -> method ->
combined gradient; ``stl``: one backward of the summed losses of T separate models), unscale,
clip, step; FAMO then re-runs the batch without gradients for its update. Statistics accumulate
on the device (:mod:`.stats`) and are read once per epoch.
"""
from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from ...optim import MTLOptimizer, MTLStepInfo
from ...optim.sparse_training import SparseTraining
from ...sparse import psn_masks
from ...weighting import LossMethod
from ..config.errors import ConfigError
from ..config.extras import parse_probe
from ..config.schema import TrainConfig, parse_milestones, parse_sparse_rule
from ..data import MTLData, Split
from ..models.branch import shared_module
from ..models.build import branch_trainer_model, build_model
from ..tasks.metrics import MetricAccumulator
from .distributed import Dist
from .optimizers import inner_optimizer, mtl_optimizer
from .probes import GradientProbe
from .selective import SelectiveGroups, selective_step
from .stats import ConflictStats, layer_index

__all__ = ["Trainer", "StepCallback", "resolve_device", "memory_format"]

#: Called after every training step with that step's :class:`~gradops.optim.MTLStepInfo` (None
#: for ``stl``; the group updates of ``selective`` call no callback, as they add no statistics).
StepCallback = Callable[[MTLStepInfo | None], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda asked for, but no CUDA device is visible",
                          ["auto", "cpu", "cuda"])
    return torch.device(name)


def memory_format(cfg: TrainConfig, device: torch.device) -> torch.memory_format:
    """The layout of the model's 4-D weights (``--memory-format``). ``auto``: channels-last for
    the built-in CNN on CPU, contiguous elsewhere. On one CPU thread at the default grid's size
    (width 32, batch 64) oneDNN's forward convolutions, BatchNorm and max-pooling ran about
    1.5x faster in it, the backward passes about as fast, so an epoch about 10% faster. Not
    bit-identical to contiguous: each step's gradients agree to float32 rounding (BatchNorm's
    statistics round differently, which can flip a max-pool's choice between near-equal
    inputs), so a run's metrics differ from a contiguous run's as a run with another seed
    would; ``contiguous`` reproduces runs made before it."""
    name = cfg.memory_format
    if name == "auto":
        name = "channels_last" if device.type == "cpu" and cfg.backbone == "cnn" else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


class _Indices:
    """A sized stand-in for a data set (``DistributedSampler`` only needs ``len``)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


@contextlib.contextmanager
def _keep_running_stats(module: nn.Module):
    """Restore BatchNorm running statistics after the block (FAMO's extra no-grad forward runs
    in train mode, as in its paper, but must not count the batch twice)."""
    bns = [m for m in module.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (a, b, c) in zip(bns, saved):
                m.running_mean.copy_(a)
                m.running_var.copy_(b)
                m.num_batches_tracked.copy_(c)


class Trainer:
    """A run's model, optimizers and loop (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, data: MTLData, device: torch.device, dist: Dist,
                 progress: bool = False):
        self.cfg, self.device, self.dist, self.progress = cfg, device, dist, progress
        self.tasks = data.tasks
        self.T = len(self.tasks)
        train = data.splits["train"]
        if cfg.train_limit:
            train = train.subset(min(cfg.train_limit, len(train)))
        evals = {k: data.splits[k] for k in ("val", "test")}
        if cfg.eval_limit:
            evals = {k: v.subset(min(cfg.eval_limit, len(v))) for k, v in evals.items()}
        self.splits = {name: self._to_device(s) for name, s in
                       (("train", train), ("val", evals["val"]), ("test", evals["test"]))}
        if cfg.batch_size % dist.world:
            raise ConfigError("--batch-size", f"{cfg.batch_size} is not divisible by the "
                              f"{dist.world} processes")
        self.local_batch = cfg.batch_size // dist.world
        if len(train) // dist.world < self.local_batch:
            raise ConfigError("--batch-size", f"{cfg.batch_size} exceeds the {len(train)} "
                              "training samples")

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.stl = cfg.method == "stl"
        shape = data.input_shape
        self.net: nn.Module = build_model(cfg.backbone, shape, cfg.width, self.tasks,
                                          cfg.weights or None, stl=self.stl)
        self.net.to(device)
        self.branch_report = None
        if cfg.recon:                         # Recon: the top-K layers made task-specific
            self.net, self.branch_report = branch_trainer_model(self.net, cfg, shape)
        self.memory_format = memory_format(cfg, device)
        self.net.to(memory_format=self.memory_format)   # 4-D weights only; before the optimizers
        encoder = shared_module(self.net)     # the shared parameters (a branched encoder's base)

        params = list(self.net.parameters())
        self.params = params
        inner = inner_optimizer(cfg, params)

        rule, kind, value = parse_sparse_rule(cfg.sparse)
        masks = None
        if kind != "off":       # random positions: a function of the seed only
            gen = torch.Generator().manual_seed(cfg.seed) if rule == "random" else None
            masks = psn_masks(encoder, **{kind: value}, method=rule, generator=gen)
        self.sparse_fraction = None if masks is None else masks.fraction

        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.scaler = (torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None)

        self.ddp = None
        if dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[dist.local_rank] if device.type == "cuda" else None)
        self.model = self.ddp if self.ddp is not None else self.net

        self.selective = (SelectiveGroups(self.T, cfg.selective_decay, cfg.selective_warmup,
                                          device=device) if cfg.method == "selective" else None)
        probe = parse_probe(cfg.probe)
        self.probe = GradientProbe(*probe) if probe is not None else None
        if self.stl or self.selective is not None:
            self.opt: torch.optim.Optimizer = (SparseTraining(inner, masks, encoder)
                                               if masks is not None else inner)
        else:
            self.opt = mtl_optimizer(cfg, inner, encoder, masks, self.scaler, self.ddp,
                                     num_tasks=self.T)
            # a loss-level method's parameters (UW's log-variances) joined the inner optimizer
            self.params = params + self.opt.method.parameters() \
                if isinstance(self.opt.method, LossMethod) else params
        self.sched = None
        if cfg.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs)
        elif cfg.schedule == "step":
            self.sched = torch.optim.lr_scheduler.StepLR(self.opt, cfg.step_size, cfg.gamma)
        elif cfg.schedule == "multistep":
            self.sched = torch.optim.lr_scheduler.MultiStepLR(
                self.opt, parse_milestones(cfg.milestones), cfg.gamma)

        self.sampler = DistributedSampler(_Indices(len(train)), num_replicas=dist.world,
                                          rank=dist.rank, shuffle=True, seed=cfg.seed,
                                          drop_last=True)
        shared = [p for p in encoder.parameters() if p.requires_grad]
        layers, index = layer_index(encoder, shared)
        self.layers = layers
        self.stats = ConflictStats(self.T, device, layers, index)
        self._step_callbacks: list[StepCallback] = [self.stats.add]

    def add_step_callback(self, fn: StepCallback) -> None:
        """Call ``fn(info)`` after every training step, after the trainer's own statistics
        (:data:`StepCallback`; ``info``'s tensors stay on the device: no host read). Recon's
        search counts its layer scores this way."""
        self._step_callbacks.append(fn)

    # --- construction helpers ---------------------------------------------------------------
    def _to_device(self, s: Split) -> Split:
        return s.to(self.device)

    def _generator(self, epoch: int, i: int) -> torch.Generator | None:
        """The RNG of training batch ``i`` of ``epoch`` for ``Split.transform`` (a function of
        the seed, the epoch, the process and the batch only, so resuming needs no state)."""
        if self.splits["train"].transform is None:
            return None
        key = ((self.cfg.seed * 1_000_003 + epoch) * 1_000_003 + self.dist.rank) * 1_000_003 + i
        return torch.Generator().manual_seed(key % (2**63 - 1))

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- one step ------------------------------------------------------------------------------
    def losses(self, module: nn.Module, x: torch.Tensor, ys: dict[str, torch.Tensor]
               ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The T task losses of ``module`` (the trainer's model, its DDP wrapper or the bare
        network) on the batch ``(x, ys)`` under autocast (``--amp``), and its outputs."""
        with self._autocast():
            outs = module(x)
        return [t.loss(outs[t.name], ys[t.name]) for t in self.tasks], outs

    def clip_and_step(self, closure=None) -> None:
        """Unscale (AMP), clip (``--clip``) and step the optimizer, after a backward;
        ``closure`` (FAMO) re-evaluates the batch's losses after the step
        (:meth:`gradops.optim.MTLOptimizer.step`)."""
        sc = self.scaler
        if sc is not None:
            sc.unscale_(self.opt)
        self._clip()
        args = () if closure is None else (closure,)
        if sc is not None:
            sc.step(self.opt, *args)       # positional: GradScaler refuses closure=
            sc.update()
        else:
            self.opt.step(*args)

    def _clip(self) -> None:
        c = self.cfg.clip
        if c <= 0:
            return
        if self.stl:      # each single-task model on its own
            for m in self.net.models.values():
                torch.nn.utils.clip_grad_norm_(m.parameters(), c)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, c)

    def _closure(self, x: torch.Tensor, ys: dict[str, torch.Tensor]):
        """For a method that re-evaluates the losses after the step (FAMO): the batch's losses
        from a forward of the bare network in train mode (as in FAMO's paper) that leaves the
        BatchNorm statistics as they were; None for the other methods."""
        m = getattr(self.opt, "method", None)
        if not (isinstance(m, LossMethod) and m.needs_closure):
            return None

        def closure() -> list[torch.Tensor]:
            with _keep_running_stats(self.net):
                return self.losses(self.net, x, ys)[0]
        return closure

    def step(self, x: torch.Tensor, ys: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training step on the batch ``(x, ys)`` (module docstring): returns the T losses
        before the step (a detached float tensor) and the forward's outputs; then calls the
        step callbacks (:meth:`add_step_callback`)."""
        if self.probe is not None:            # before the step, on the batch's first samples
            self.probe.step(self.net, [p for p in shared_module(self.net).parameters()
                                       if p.requires_grad], self.tasks, x, ys)
        if self.selective is not None:
            return self._selective_step(x, ys)
        losses, outs = self.losses(self.model, x, ys)
        self.opt.zero_grad(set_to_none=True)
        values = torch.stack([v.detach().float() for v in losses])
        sc = self.scaler
        info = None
        if self.stl:
            total = torch.stack(losses).sum()
            (sc.scale(total) if sc is not None else total).backward()
        else:   # a loss-level method turns the losses into its terms in backward
            info = self.opt.backward(sc.scale(losses) if sc is not None else losses)
        self.clip_and_step(self._closure(x, ys))
        for fn in self._step_callbacks:
            fn(info)
        return values, outs

    def _selective_step(self, x: torch.Tensor, ys: dict[str, torch.Tensor]):
        """One batch of ``--method selective`` on the trainer's model and optimizer (AMP's
        GradScaler, clipping and sparse training as in the other methods); returns the losses
        before the first group's step and that forward's outputs."""
        sc = self.scaler

        def forward():
            return self.losses(self.model, x, ys)

        def update(loss: torch.Tensor) -> None:
            self.opt.zero_grad(set_to_none=True)
            (sc.scale(loss) if sc is not None else loss).backward()
            self.clip_and_step()

        def measure():
            with torch.no_grad(), _keep_running_stats(self.net):
                return self.losses(self.net, x, ys)[0]

        return selective_step(self.selective, forward, update, measure, reduce=self.dist.mean_)

    # --- epochs --------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` (from 1); returns its ``train`` line (losses, metrics, gc), its
        statistics (under ``"conflicts"``) and the solver failures (``"nonconverged"``). The
        train metrics are those of the predictions made during the epoch, before each step."""
        t0 = time.perf_counter()
        self.model.train()
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(iter(self.sampler)), dtype=torch.long, device=self.device)
        b = self.local_batch
        nb = len(idx) // b
        tr = self.splits["train"]
        loss_sum = torch.zeros(self.T, dtype=torch.float64, device=self.device)
        acc = MetricAccumulator(self.tasks, self.device, self.dist)
        self.stats.reset()
        bar = range(nb)
        if self.progress and self.dist.main:
            from tqdm import tqdm
            bar = tqdm(bar, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False,
                       dynamic_ncols=True)
        for i in bar:
            bi = idx[i * b:(i + 1) * b]
            x, ys = tr.batch(bi, self._generator(epoch, i))
            values, outs = self.step(x, ys)
            loss_sum += values.double()
            acc.add(outs, ys)
        mean_losses = self.dist.mean_(loss_sum / max(nb, 1))
        if isinstance(self.opt, MTLOptimizer):
            self.opt.end_epoch(mean_losses.float())      # DWA's epoch-level weights
        if self.sched is not None:
            self.sched.step()
        line = self._line(epoch, "train", mean_losses, acc.result())
        conf = self.stats.read()
        line["gc"] = None if conf is None else conf["incidence"]
        line["time_s"] = time.perf_counter() - t0
        line["conflicts"] = conf
        # the optimizer's own per-epoch means (reset here); a solver that failed to converge on
        # some steps is reported by a RuntimeWarning and counted in result.json
        line["nonconverged"] = (self.opt.stats()["nonconverged"]
                                if isinstance(self.opt, MTLOptimizer) else 0)
        if self.probe is not None:
            self.probe.end_epoch(epoch)       # written by the run (probes.csv)
        return line

    @torch.no_grad()
    def evaluate(self, epoch: int, split: str) -> dict[str, Any]:
        """The ``split`` line of ``epoch``: mean losses and metrics over the whole split."""
        t0 = time.perf_counter()
        s = self.splits[split]
        self.net.eval()
        n = len(s)
        loss_sum = torch.zeros(self.T, dtype=torch.float64, device=self.device)
        acc = MetricAccumulator(self.tasks, self.device)
        for a in range(0, n, self.cfg.eval_batch_size):
            x, ys = s.batch(slice(a, a + self.cfg.eval_batch_size))
            losses, outs = self.losses(self.net, x, ys)
            loss_sum += torch.stack([v.double() for v in losses]) * len(x)
            acc.add(outs, ys)
        self.net.train()
        line = self._line(epoch, split, loss_sum / n, acc.result())
        line["gc"] = None
        line["time_s"] = time.perf_counter() - t0
        return line

    def _line(self, epoch: int, split: str, losses: torch.Tensor,
              metrics: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One metrics.jsonl object (one device-to-host transfer)."""
        names = [(t, k) for t, d in metrics.items() for k in d]
        vals = torch.cat([losses.double().reshape(-1)] +
                         [metrics[t][k].double().reshape(1) for t, k in names]).tolist()
        out_m: dict[str, dict[str, float]] = {}
        for (t, k), v in zip(names, vals[self.T:]):
            out_m.setdefault(t, {})[k] = v
        return {"epoch": epoch, "split": split,
                "losses": {t.name: v for t, v in zip(self.tasks, vals[:self.T])},
                "metrics": out_m}

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next epoch depends on."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": np.random.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": None if self.sched is None else self.sched.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "rng": rng,
                "addons": {"selective": None if self.selective is None
                           else self.selective.state_dict(),
                           "probe": None if self.probe is None else self.probe.state_dict()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.net.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(sd["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(sd["scaler"])
        for name, obj in (("selective", self.selective), ("probe", self.probe)):
            if obj is not None:
                obj.load_state_dict(sd["addons"][name])
        rng = sd["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
