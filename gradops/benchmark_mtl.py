"""One multi-task training step, end to end: ``gradops bench --suite mtl`` (issue 5's headline).

The model (ANCHORS.md's): a 4-layer MLP encoder, ``Linear(1024, 1024) + ReLU`` x 4 (4,198,400
shared parameters), ``T`` linear heads ``Linear(1024, 16)`` (task-specific), batch 64 of fixed
random data, one MSE loss per task, fp32. Every contender owns an identical copy of the model
(same initialisation) and its own plain ``torch.optim.SGD`` (lr 1e-4, no momentum), and one call
is one whole training step:

* **floor** (``FLOOR``): ``zero_grad`` + forward + ``T`` backward passes
  (``loss_t.backward(retain_graph=t < T - 1)``, accumulating into ``.grad``) + ``step``. The cost
  of forming the per-task gradients explicitly: issue 5's reference point. MTLOptimizer's
  Linear engine (``linear_gram``) never forms the encoder's per-task weight gradients (it keeps
  them as ``D_t^T X`` factors), so it can run below this "floor".
* **EW, summed loss** (``SUM``): ``zero_grad`` + forward + ``sum(losses).backward()`` + ``step``
  (a reference line: no per-task gradients at all).
* **batched floor** (``BATCHED``, in the ew group): the same per-task gradients from one
  ``torch.autograd.grad(stack(losses), shared, grad_outputs=eye(T), is_grads_batched=True)``
  (vmap over the backward) instead of ``T`` passes, + ``step``: issue 5's optional alternative
  for computing ``J``, measured here; MTLOptimizer keeps the ``T`` sequential passes while this
  is not faster.
* **gradops** (``GRADOPS``): ``opt.zero_grad()`` + forward + ``opt.backward(losses)`` +
  ``opt.step()`` with :class:`gradops.optim.mtl.MTLOptimizer` (``shared=`` the encoder). For
  ``ew`` this is one backward of the summed loss (the wrapper needs no per-task gradients), so
  the ew group also times ``stats=True`` (per-task gradients + per-layer Grams and statistics).
  Where ``linear_gram="auto"`` takes the encoder's Linear layers in factored form (as the
  optimizer reports after one step; on CPU here at T = 3, 8 and 40), the group also times
  ``linear_gram="off"`` (``GRADOPS_BUFFER``: per-task gradients formed into ``J``), side by
  side.
* **TorchJD** (``TORCHJD``): ``zero_grad`` + forward + ``torchjd.autojac.mtl_backward(losses,
  features=...)`` + ``jac_to_grad(shared, aggregator)`` + ``step``, with the aggregator of the
  same method (``Mean`` for ew, ``PCGrad``, ``GradDrop``, ``MGDA``, ``CAGrad``, ``IMTLG``,
  ``NashMTL``, ``AlignedMTL``, ``GradVac``). TorchJD has no per-layer PCGrad, and its GradVac is
  whole-model (gradops' is per layer, as in the paper); CAGrad and NashMTL need cvxpy (and
  clarabel / ecos) and are skipped, with a note, where those are not installed.

Per ``T`` and per method, the contenders are timed interleaved round by round in one
:func:`gradops.benchmark.time_side_by_side` run, and every ratio is to the floor measured in that
same run (the floor is re-measured in every method's group). Each row also gives the fastest
step over the floor's fastest step ("min/min"), and the load average when the group started.

On a shared machine, run with ``OMP_WAIT_POLICY=PASSIVE`` (recorded in the CSV): with torch's
default spinning OpenMP threads, every parallel region of a 2-thread process stalls whenever
another process holds one of the cores, and whole steps ran 5-10x slower and erratic here
(T = 8 floor steps of 1.2-2.1 s, against 0.3-0.5 s with PASSIVE, in back-to-back runs at a
load average of 5 on 2 cores).

:func:`breakdown_case` splits gradops' step into its stages (forward, the ``T`` backward passes
into the ``[T, P]`` buffer, Gram, weights, combine, optimizer step), timed one by one with a
device sync around each, beside the floor's ``T`` backward passes.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .benchmark import _sync, device_name, time_side_by_side

FLOOR = "floor: T backward passes + step"
SUM = "EW: one backward of the summed loss + step"
GRADOPS = "gradops MTLOptimizer"
GRADOPS_STATS = "gradops MTLOptimizer (stats=True)"
GRADOPS_BUFFER = "gradops MTLOptimizer (linear_gram='off')"  # the J path for every parameter
BATCHED = "floor, batched: one vmap'd backward for all T tasks + step"
TORCHJD = "TorchJD mtl_backward + jac_to_grad"

METHODS = ("ew", "pcgrad", "pcgrad_layer", "graddrop", "mgda", "cagrad", "imtlg", "nashmtl",
           "alignedmtl", "gradvac")
"""The methods of the suite; ``pcgrad_layer`` is ``MTLOptimizer(method="pcgrad",
per_layer=True)``."""

GRAM_WEIGHTED = ("pcgrad", "mgda", "cagrad", "imtlg", "nashmtl", "alignedmtl")
"""Methods whose weights come from the whole-model Gram (issue 5's 1.15x target covers these,
GradDrop, and the per-layer methods)."""

def _torchjd_factories() -> dict[str, tuple[str, Callable[[int], object]]]:
    from torchjd import aggregation as A
    return {
        "ew": ("Mean", lambda T: A.Mean()),
        "pcgrad": ("PCGrad", lambda T: A.PCGrad()),
        "graddrop": ("GradDrop", lambda T: A.GradDrop()),
        "mgda": ("MGDA", lambda T: A.MGDA()),
        "cagrad": ("CAGrad(c=0.4)", lambda T: A.CAGrad(c=0.4)),
        "imtlg": ("IMTLG", lambda T: A.IMTLG()),
        "nashmtl": ("NashMTL", lambda T: A.NashMTL(n_tasks=T)),
        "alignedmtl": ("AlignedMTL", lambda T: A.AlignedMTL()),
        "gradvac": ("GradVac (whole model, not per layer)", lambda T: A.GradVac()),
    }


def torchjd_aggregator(method: str, T: int) -> tuple[object | None, str]:
    """TorchJD's aggregator for ``method`` and its label, or ``(None, why)`` when TorchJD is not
    installed, has no such method, or the aggregator's optional dependencies are missing (checked
    by aggregating a small random Jacobian)."""
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return None, "torchjd not installed"
    facts = _torchjd_factories()
    if method not in facts:
        return None, "no TorchJD counterpart"
    label, make = facts[method]
    try:
        agg = make(T)
        agg(torch.randn(T, 5, generator=torch.Generator().manual_seed(0)))
        if hasattr(agg, "reset"):
            agg.reset()
    except Exception as exc:  # ImportError of cvxpy & co., raised by the aggregator
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"TorchJD {label} skipped: {msg}"
    return agg, label


# --- the model ----------------------------------------------------------------------------------
class MTLNet(nn.Module):
    """``depth`` x (``Linear(width, width)`` + ReLU) shared encoder, ``T`` heads
    ``Linear(width, head_out)``."""

    def __init__(self, T: int, width: int = 1024, depth: int = 4, head_out: int = 16):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, head_out) for _ in range(T))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.encoder(x)
        return f, [h(f) for h in self.heads]


@dataclasses.dataclass
class MTLSetup:
    """A model, its fixed batch, and the constructor arguments of the contenders."""
    T: int
    width: int
    depth: int
    batch: int
    head_out: int
    device: torch.device
    model: MTLNet
    x: torch.Tensor
    y: torch.Tensor           # [T, batch, head_out]
    lr: float = 1e-4

    @property
    def shared_params(self) -> int:
        return sum(p.numel() for p in self.model.encoder.parameters())

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def fresh(self) -> tuple[MTLNet, torch.optim.Optimizer]:
        """A copy of the model (same initial weights) and a fresh SGD over all its parameters."""
        m = copy.deepcopy(self.model)
        return m, torch.optim.SGD(m.parameters(), lr=self.lr)

    def losses(self, outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [F.mse_loss(o, self.y[t]) for t, o in enumerate(outs)]


def make_setup(T: int, device: torch.device | str = "cpu", width: int = 1024, depth: int = 4,
               batch: int = 64, head_out: int = 16, seed: int = 0) -> MTLSetup:
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = MTLNet(T, width, depth, head_out).to(dev)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, width, generator=g).to(dev)
    y = torch.randn(T, batch, head_out, generator=g).to(dev)
    return MTLSetup(T, width, depth, batch, head_out, dev, model, x, y)


# --- the contenders: each returns a closure doing one training step -----------------------------
def floor_step(s: MTLSetup) -> Callable[[], None]:
    model, opt = s.fresh()
    T = s.T

    def step():
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        losses = s.losses(outs)
        for t, loss in enumerate(losses):
            loss.backward(retain_graph=t < T - 1)
        opt.step()
    step.model = model  # type: ignore[attr-defined]
    return step


def sum_step(s: MTLSetup) -> Callable[[], None]:
    model, opt = s.fresh()

    def step():
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        torch.stack(s.losses(outs)).sum().backward()
        opt.step()
    step.model = model  # type: ignore[attr-defined]
    return step


def batched_floor_step(s: MTLSetup) -> Callable[[], None]:
    model, opt = s.fresh()
    shared = list(model.encoder.parameters())
    heads = [p for h in model.heads for p in h.parameters()]
    eye = torch.eye(s.T, device=s.device)

    def step():
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        losses = torch.stack(s.losses(outs))
        rows = torch.autograd.grad(losses, shared, grad_outputs=eye, is_grads_batched=True,
                                   retain_graph=True)
        for p, r in zip(shared, rows):      # the summed update, as the floor's .grad holds
            p.grad = r.sum(0)
        hg = torch.autograd.grad(losses.sum(), heads)
        for p, g in zip(heads, hg):
            p.grad = g
        opt.step()
    step.model = model  # type: ignore[attr-defined]
    return step


def gradops_optimizer(s: MTLSetup, method: str, model: MTLNet, inner: torch.optim.Optimizer,
                      **kwargs):
    from .optim.mtl import MTLOptimizer
    per_layer = method == "pcgrad_layer"
    name = "pcgrad" if per_layer else method
    return MTLOptimizer(inner, method=name, shared=model.encoder, per_layer=per_layer,
                        generator=torch.Generator(device=s.device).manual_seed(0), **kwargs)


def gradops_step(s: MTLSetup, method: str, **kwargs) -> Callable[[], None]:
    model, inner = s.fresh()
    opt = gradops_optimizer(s, method, model, inner, **kwargs)

    def step():
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        opt.backward(s.losses(outs))
        opt.step()
    step.optimizer = opt  # type: ignore[attr-defined]
    step.model = model  # type: ignore[attr-defined]
    return step


def _uses_linear_engine(step: Callable[[], None]) -> bool:
    """Run one gradops step and tell whether its optimizer took any layer in factored form (the
    Linear engine's own decision: cost model, device, method)."""
    step()
    engine = step.optimizer._engine  # type: ignore[attr-defined]
    return engine is not None and engine.last_active > 0


def torchjd_step(s: MTLSetup, aggregator) -> Callable[[], None]:
    from torchjd.autojac import jac_to_grad, mtl_backward
    model, opt = s.fresh()
    shared = list(model.encoder.parameters())
    heads = [list(h.parameters()) for h in model.heads]

    def step():
        opt.zero_grad(set_to_none=True)
        feats, outs = model(s.x)
        mtl_backward(s.losses(outs), features=feats, shared_params=shared, tasks_params=heads)
        jac_to_grad(shared, aggregator)
        opt.step()
    step.model = model  # type: ignore[attr-defined]
    return step


# --- rows ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class MTLRow:
    method: str
    impl: str
    T: int
    shared_params: int
    total_params: int
    batch: int
    optimizer: str
    dtype: str
    device: str
    ms: float             # median ms per training step
    x_floor: float        # ms / ms of the floor measured in the same interleaved run
    ms_min: float         # fastest step (least disturbed by the machine's other load)
    x_floor_min: float    # ms_min / the floor's ms_min
    rounds: int           # timed rounds (after one warm-up step)
    load_1min: float      # the machine's 1-minute load average when the group started
    omp_wait_policy: str  # $OMP_WAIT_POLICY of the run ("" when unset)
    note: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _recorded(fn: Callable[[], object], device: torch.device
              ) -> tuple[Callable[[], object], list[float]]:
    """``fn`` wrapped to record the seconds of each call (synced, as time_side_by_side's)."""
    times: list[float] = []

    def call():
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        return out
    return call, times


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def bench_mtl_group(s: MTLSetup, method: str, rounds: int = 15, budget_s: float = 20.0,
                    torchjd: bool = True) -> tuple[list[MTLRow], list[str]]:
    """Time, interleaved, one method's contenders on ``s``: the floor, gradops, TorchJD (and, for
    ew, the summed-loss backward and gradops with ``stats=True``). Returns rows and notes."""
    if method not in METHODS:
        raise ValueError(f"bench_mtl_group: unknown method {method!r}; valid: {', '.join(METHODS)}")
    notes: list[str] = []
    fns: dict[str, Callable[[], object]] = {FLOOR: floor_step(s)}
    labels: dict[str, str] = {}
    if method == "ew":
        fns[SUM] = sum_step(s)
        fns[BATCHED] = batched_floor_step(s)
    fns[GRADOPS] = gradops_step(s, method)
    labels[GRADOPS] = f"MTLOptimizer(method={'pcgrad' if method == 'pcgrad_layer' else method!r}" \
        + (", per_layer=True" if method == "pcgrad_layer" else "") + ")"
    if method == "ew":
        fns[GRADOPS_STATS] = gradops_step(s, method, stats=True)
        labels[GRADOPS_STATS] = "per-task gradients + per-layer Grams, conflict counts, GMS"
    elif _uses_linear_engine(fns[GRADOPS]):
        fns[GRADOPS_BUFFER] = gradops_step(s, method, linear_gram="off")
        labels[GRADOPS_BUFFER] = "per-task gradients formed into J (the Linear engine off)"
    if torchjd and s.device.type in ("cpu", "cuda"):
        if method == "pcgrad_layer":
            agg, label = None, "TorchJD has no per-layer PCGrad"
        else:
            agg, label = torchjd_aggregator(method, s.T)
        if agg is None:
            notes.append(f"{method}, T = {s.T}: {label}")
        else:
            fns[TORCHJD] = torchjd_step(s, agg)
            labels[TORCHJD] = label
    rec = {k: _recorded(f, s.device) for k, f in fns.items()}
    load = _load()
    secs = time_side_by_side({k: c[0] for k, c in rec.items()}, s.device, rounds, budget_s)
    floor = secs[FLOOR]
    best = {k: min(c[1][1:]) for k, c in rec.items()}     # [0] is the warm-up call
    rows = [MTLRow(method=method, impl=name, T=s.T, shared_params=s.shared_params,
                   total_params=s.total_params, batch=s.batch, optimizer=f"SGD(lr={s.lr})",
                   dtype="float32", device=device_name(s.device), ms=sec * 1e3,
                   x_floor=sec / floor, ms_min=best[name] * 1e3,
                   x_floor_min=best[name] / best[FLOOR], rounds=len(rec[name][1]) - 1,
                   load_1min=load, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
                   note=labels.get(name, ""))
            for name, sec in secs.items()]
    return rows, notes


def bench_mtl(Ts: Sequence[int], methods: Sequence[str] = METHODS, device: str = "cpu",
              width: int = 1024, depth: int = 4, batch: int = 64, rounds: int = 15,
              budget_s: float = 20.0, torchjd: bool = True,
              progress: Callable[[str], None] | None = None) -> tuple[list[MTLRow], list[str]]:
    """Every (T, method) group of the suite; rows and notes (skipped contenders)."""
    rows: list[MTLRow] = []
    notes: list[str] = []
    for T in Ts:
        s = make_setup(T, device, width=width, depth=depth, batch=batch)
        for m in methods:
            r, n = bench_mtl_group(s, m, rounds=rounds, budget_s=budget_s, torchjd=torchjd)
            rows += r
            notes += n
            if progress is not None:
                g = next(x for x in r if x.impl == GRADOPS)
                t = next((x for x in r if x.impl == TORCHJD), None)
                progress(f"  T = {T} {m}: floor {r[0].ms:.1f} ms (min {r[0].ms_min:.1f}), "
                         f"gradops {g.x_floor:.2f}x (min/min {g.x_floor_min:.2f}x)"
                         + (f", TorchJD {t.x_floor:.2f}x ({t.x_floor_min:.2f}x)" if t else "")
                         + f" ({g.rounds} rounds, load {g.load_1min:.2f})")
    return rows, notes


# --- where gradops' time goes -------------------------------------------------------------------
@dataclasses.dataclass
class StageRow:
    method: str
    stage: str
    T: int
    ms: float            # median over the rounds
    share: float         # ms / the whole gradops step, timed in the same rounds
    x_floor: float       # ms / the floor step, timed in the same rounds
    device: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# the functions and methods MTLOptimizer.backward calls, timed where they are looked up:
# (object path, attribute, stage label); a name missing from the current code is skipped
_MODULE_STAGES = (
    ("gradops.optim.mtl", "gram", "gram (one pass over J)"),
    ("gradops.optim.mtl", "segment_gram", "segment_gram (per-layer Grams, one pass)"),
    ("gradops.optim.mtl", "combine", "combine (w^T J into .grad, one pass)"),
    ("gradops.metrics", "conflict_incidence", "conflict_incidence (T x T)"),
)
_METHOD_STAGES = (
    ("_per_task_backward", "T per-task backward passes (into J; D_t for the Linear engine)"),
    ("_gram", "Gram (Linear engine, + J's other columns)"),
    ("_layer_grams", "per-layer Grams (Linear engine, + J's other columns)"),
    ("_combine_with", "combine (Linear engine, + J's other columns) into .grad"),
    ("_weighted_backward", "one backward of the weighted loss sum"),
    ("_weights_from", "weights (T x T solve)"),
    ("_accumulate", "statistics accumulation"),
)


def _timed(fn: Callable, label: str, out: dict[str, float], device: torch.device,
           depth: list[int]) -> Callable:
    """``fn``, timed (with a device sync around it) into ``out[label]``; a call made inside
    another timed call counts for the outer one only (``depth`` is shared by one step's timers)."""
    def call(*args, **kwargs):
        if depth[0]:
            return fn(*args, **kwargs)
        depth[0] += 1
        try:
            _sync(device)
            t0 = time.perf_counter()
            res = fn(*args, **kwargs)
            _sync(device)
            out[label] = out.get(label, 0.0) + time.perf_counter() - t0
            return res
        finally:
            depth[0] -= 1
    return call


def _stage_times(opt, model, s: MTLSetup) -> dict[str, float]:
    """One gradops training step, split into stages by timing (with a device sync around each)
    the functions and methods that ``MTLOptimizer.backward`` calls (patched for the duration of
    the call, then restored): nothing of the wrapper's code path is re-implemented here. What
    ``backward`` spends outside those is reported as "rest of backward" (for GradDrop: its fused
    pass and the copy into the .grad buffer)."""
    import importlib
    dev = s.device
    out: dict[str, float] = {}
    depth = [0]
    patched: list[tuple[object, str, object, bool]] = []
    for modname, attr, label in _MODULE_STAGES:
        mod = importlib.import_module(modname)
        if hasattr(mod, attr):
            orig = getattr(mod, attr)
            setattr(mod, attr, _timed(orig, label, out, dev, depth))
            patched.append((mod, attr, orig, False))
    for attr, label in _METHOD_STAGES:
        if hasattr(opt, attr):
            setattr(opt, attr, _timed(getattr(opt, attr), label, out, dev, depth))
            patched.append((opt, attr, None, True))
    try:
        _sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        losses = s.losses(outs)
        _sync(dev)
        t1 = time.perf_counter()
        opt.backward(losses)
        _sync(dev)
        t2 = time.perf_counter()
        opt.step()
        _sync(dev)
        t3 = time.perf_counter()
    finally:
        for obj, attr, orig, is_instance in reversed(patched):
            if is_instance:
                delattr(obj, attr)          # back to the class's method
            else:
                setattr(obj, attr, orig)
    inner = sum(out.values())
    res = {"forward + losses": t1 - t0, **out,
           "rest of backward (Python, info; GradDrop's fused pass)": (t2 - t1) - inner,
           "optimizer step": t3 - t2}
    return res


def _floor_stage_times(model, inner, s: MTLSetup) -> dict[str, float]:
    dev = s.device
    _sync(dev)
    t0 = time.perf_counter()
    inner.zero_grad(set_to_none=True)
    _, outs = model(s.x)
    losses = s.losses(outs)
    _sync(dev)
    t1 = time.perf_counter()
    for t, loss in enumerate(losses):
        loss.backward(retain_graph=t < s.T - 1)
    _sync(dev)
    t2 = time.perf_counter()
    inner.step()
    _sync(dev)
    t3 = time.perf_counter()
    return {"forward + losses": t1 - t0, "T backward passes": t2 - t1,
            "optimizer step": t3 - t2}


def breakdown_case(s: MTLSetup, methods: Sequence[str] = METHODS, rounds: int = 10,
                   budget_s: float = 20.0) -> list[StageRow]:
    """gradops' step split into stages, per method, interleaved with the floor's stages (round by
    round), plus both whole steps timed in the same rounds. Medians; ``x_floor`` is each stage
    over the whole floor step."""
    dev = s.device
    contenders = {}
    for m in methods:
        model, inner = s.fresh()
        contenders[m] = (gradops_optimizer(s, m, model, inner), model)
    fmodel, finner = s.fresh()
    whole_floor = floor_step(s)
    whole = {m: gradops_step(s, m) for m in methods}
    for m, (opt, model) in contenders.items():      # warm-up (builds the buffers)
        _, outs = model(s.x)
        opt.zero_grad()
        opt.backward(s.losses(outs))
        opt.step()
    _floor_stage_times(fmodel, finner, s)
    for f in (whole_floor, *whole.values()):
        f()
    stage: dict[str, dict[str, list[float]]] = {m: {} for m in [*methods, "floor"]}
    step_t: dict[str, list[float]] = {m: [] for m in [*methods, "floor"]}
    start = time.perf_counter()
    for r in range(rounds):
        for name, sec in _floor_stage_times(fmodel, finner, s).items():
            stage["floor"].setdefault(name, []).append(sec)
        _sync(dev)
        t0 = time.perf_counter()
        whole_floor()
        _sync(dev)
        step_t["floor"].append(time.perf_counter() - t0)
        for m, (opt, model) in contenders.items():
            for name, sec in _stage_times(opt, model, s).items():
                stage[m].setdefault(name, []).append(sec)
            _sync(dev)
            t0 = time.perf_counter()
            whole[m]()
            _sync(dev)
            step_t[m].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    floor = statistics.median(step_t["floor"])
    rows = []
    for m in ["floor", *methods]:
        whole_m = statistics.median(step_t[m])
        for name, v in stage[m].items():
            med = statistics.median(v)
            rows.append(StageRow(method=m, stage=name, T=s.T, ms=med * 1e3, share=med / whole_m,
                                 x_floor=med / floor, device=device_name(dev)))
        rows.append(StageRow(method=m, stage="whole step (timed apart)", T=s.T, ms=whole_m * 1e3,
                             share=1.0, x_floor=whole_m / floor, device=device_name(dev)))
    return rows


# --- output ------------------------------------------------------------------------------------
def format_mtl_table(rows: Sequence[MTLRow]) -> str:
    """One line per (T, method): the floor, gradops, TorchJD (and EW's reference lines).
    Cells: median ms per step (x the floor of the same run); "min/min": the fastest step over
    the fastest floor step of the same run (the least disturbed by other load)."""
    head = ("| T | method | floor (T backward) | gradops | TorchJD | gradops, min/min | "
            "TorchJD, min/min | TorchJD aggregator |\n|---:|---|---:|---:|---:|---:|---:|---|")
    by = {}
    for r in rows:
        by.setdefault((r.T, r.method), {})[r.impl] = r
    body = []
    for (T, m), d in by.items():
        fl, g, jd = d[FLOOR], d.get(GRADOPS), d.get(TORCHJD)
        cell = (lambda r: f"{r.ms:.1f} ({r.x_floor:.2f}x)" if r else "—")
        best = (lambda r: f"{r.ms_min:.1f} ({r.x_floor_min:.2f}x)" if r else "—")
        body.append(f"| {T} | {m} | {fl.ms:.1f} | {cell(g)} | {cell(jd)} | {best(g)} | "
                    f"{best(jd)} | {jd.note if jd else '—'} |")
        if SUM in d:
            body.append(f"| {T} | ew: one summed backward (reference) | {fl.ms:.1f} | "
                        f"{cell(d[SUM])} | — | {best(d[SUM])} | — | — |")
        if BATCHED in d:
            body.append(f"| {T} | per-task gradients by one batched (vmap) backward | "
                        f"{fl.ms:.1f} | {cell(d[BATCHED])} | — | {best(d[BATCHED])} | — | — |")
        if GRADOPS_BUFFER in d:
            body.append(f"| {T} | {m}, linear_gram='off' (all through J) | {fl.ms:.1f} | "
                        f"{cell(d[GRADOPS_BUFFER])} | — | {best(d[GRADOPS_BUFFER])} | — | — |")
        if GRADOPS_STATS in d:
            body.append(f"| {T} | ew, stats=True (per-task grads + per-layer stats) | "
                        f"{fl.ms:.1f} | {cell(d[GRADOPS_STATS])} | — | {best(d[GRADOPS_STATS])}"
                        " | — | — |")
    return "\n".join([head, *body])


def format_stage_table(rows: Sequence[StageRow]) -> str:
    head = ("| method | stage | ms | share of its step | x floor step |\n"
            "|---|---|---:|---:|---:|")
    body = [f"| {r.method} | {r.stage} | {r.ms:.2f} | {r.share:.2f} | {r.x_floor:.3f} |"
            for r in rows]
    return "\n".join([head, *body])
