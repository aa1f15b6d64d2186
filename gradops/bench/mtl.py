"""One multi-task training step, end to end: ``gradops bench --suite mtl`` .

The model: a 4-layer MLP encoder, ``Linear(1024, 1024) + ReLU`` x 4 (4,198,400
shared parameters), ``T`` linear heads ``Linear(1024, 16)`` (task-specific), batch 64 of fixed
random data, one MSE loss per task, fp32. Every contender owns an identical copy of the model
(same initialisation) and its own plain ``torch.optim.SGD`` (lr 1e-4, no momentum), and one call
is one whole training step:

* **floor** (``FLOOR``): ``zero_grad`` + forward + ``T`` backward passes
  (``loss_t.backward(retain_graph=t < T - 1)``, accumulating into ``.grad``) + ``step``. The cost
  of forming the per-task gradients explicitly: the suite's reference point. MTLOptimizer's
  Linear engine (``linear_gram``) never forms the encoder's per-task weight gradients (it keeps
  them as ``D_t^T X`` factors), so it can run below this "floor".
* **EW, summed loss** (``SUM``): ``zero_grad`` + forward + ``sum(losses).backward()`` + ``step``
  (a reference line: no per-task gradients at all).
* **batched floor** (``BATCHED``, in the ew group): the same per-task gradients from one
  ``torch.autograd.grad(stack(losses), shared, grad_outputs=eye(T), is_grads_batched=True)``
  (vmap over the backward) instead of ``T`` passes, + ``step``: an alternative way to
  compute ``J``, measured here; MTLOptimizer keeps the ``T`` sequential passes while this
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
:func:`gradops.bench.timing.time_side_by_side` run, and every ratio is to the floor measured in that
same run (the floor is re-measured in every method's group; the order of the contenders rotates
each round). Each row also gives the median of the per-round ratios to that round's floor step
("paired": robust to the machine's speed drifting between rounds), the fastest step over the
floor's fastest step ("min/min"), and the load average when the group started.

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

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
from collections.abc import Callable, Sequence

import torch

from .._backend import use_backend
from .gram import parse_ints
from ..weighting import canonical_name, method_names
from .models import MTLSetup, make_setup
from .mtl_breakdown import breakdown_case, format_pass_table, format_stage_table
from .mtl_memory import METHODS as MEM_METHODS, bench_memory, format_memory_table
from .mtl_steps import batched_floor_step, floor_step, gradops_step, sum_step, torchjd_step
from .peers import torchjd_aggregator
from .report import emit, write_csv
from .timing import device_name, load_average, recorded, time_side_by_side

FLOOR = "floor: T backward passes + step"


SUM = "EW: one backward of the summed loss + step"


GRADOPS = "gradops MTLOptimizer"


GRADOPS_STATS = "gradops MTLOptimizer (stats=True)"


GRADOPS_BUFFER = "gradops MTLOptimizer (linear_gram='off')"  # the J path for every parameter


BATCHED = "floor, batched: one vmap'd backward for all T tasks + step"


TORCHJD = "TorchJD mtl_backward + jac_to_grad"


METHODS = method_names(("sum", "gram", "layer", "elementwise"))
"""The methods of the suite: every registered gradient method (the registry's kinds ``sum``,
``gram``, ``layer`` and ``elementwise``; loss-level methods cost what EW costs)."""

GRAM_WEIGHTED = method_names("gram")
"""Methods whose weights come from the whole-model Gram (the step-time target covers these,
GradDrop, and the per-layer methods; docs/benchmarks.md)."""


def _uses_linear_engine(step: Callable[[], None]) -> bool:
    """Run one gradops step and tell whether its optimizer took any layer in factored form (the
    Linear engine's own decision: cost model, device, method)."""
    step()
    engine = step.optimizer._engine  # type: ignore[attr-defined]
    return engine is not None and engine.last_active > 0


# --- rows ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class MTLRow:
    method: str
    impl: str
    T: int
    encoder: str
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
    x_floor_paired: float  # median over rounds of (this step / the floor's step of that round)
    rounds: int           # timed rounds (after one warm-up step)
    load_1min: float      # the machine's 1-minute load average when the group started
    omp_wait_policy: str  # $OMP_WAIT_POLICY of the run ("" when unset)
    note: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _canonical(name: str) -> str:
    """The registered spelling of a method name (unknown names are kept, for the error)."""
    try:
        return canonical_name(name)
    except ValueError:
        return name


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
    labels[GRADOPS] = f"MTLOptimizer(method={method!r})"
    if method == "ew":
        fns[GRADOPS_STATS] = gradops_step(s, method, stats=True)
        labels[GRADOPS_STATS] = "per-task gradients + per-layer Grams, conflict counts, GMS"
    elif _uses_linear_engine(fns[GRADOPS]):
        fns[GRADOPS_BUFFER] = gradops_step(s, method, linear_gram="off")
        labels[GRADOPS_BUFFER] = "per-task gradients formed into J (the Linear engine off)"
    if torchjd and s.device.type in ("cpu", "cuda"):
        if method == "pcgrad-layer":
            agg, label = None, "TorchJD has no per-layer PCGrad"
        else:
            agg, label = torchjd_aggregator(method, s.T)
        if agg is None:
            notes.append(f"{method}, T = {s.T}: {label}")
        else:
            fns[TORCHJD] = torchjd_step(s, agg)
            labels[TORCHJD] = label
    rec = {k: recorded(f, s.device) for k, f in fns.items()}
    load = load_average()
    secs = time_side_by_side({k: c[0] for k, c in rec.items()}, s.device, rounds, budget_s)
    floor = secs[FLOOR]
    best = {k: min(c[1][1:]) for k, c in rec.items()}     # [0] is the warm-up call
    rows = [MTLRow(method=method, impl=name, T=s.T, encoder=s.encoder,
                   shared_params=s.shared_params,
                   total_params=s.total_params, batch=s.batch, optimizer=f"SGD(lr={s.lr})",
                   dtype="float32", device=device_name(s.device), ms=sec * 1e3,
                   x_floor=sec / floor, ms_min=best[name] * 1e3,
                   x_floor_min=best[name] / best[FLOOR],
                   x_floor_paired=statistics.median(
                       a / b for a, b in zip(rec[name][1][1:], rec[FLOOR][1][1:])),
                   rounds=len(rec[name][1]) - 1,
                   load_1min=load, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
                   note=labels.get(name, ""))
            for name, sec in secs.items()]
    return rows, notes


def bench_mtl(Ts: Sequence[int], methods: Sequence[str] = METHODS, device: str = "cpu",
              width: int = 1024, depth: int = 4, batch: int | None = None, rounds: int = 15,
              budget_s: float = 20.0, torchjd: bool = True, encoder: str = "mlp",
              progress: Callable[[str], None] | None = None) -> tuple[list[MTLRow], list[str]]:
    """Every (T, method) group of the suite; rows and notes (skipped contenders). ``encoder``:
    ``"mlp"`` or ``"cnn"`` (:func:`gradops.bench.models.make_setup`)."""
    rows: list[MTLRow] = []
    notes: list[str] = []
    for T in Ts:
        s = make_setup(T, device, width=width, depth=depth, batch=batch, encoder=encoder)
        for m in methods:
            r, n = bench_mtl_group(s, m, rounds=rounds, budget_s=budget_s, torchjd=torchjd)
            rows += r
            notes += n
            if progress is not None:
                g = next(x for x in r if x.impl == GRADOPS)
                t = next((x for x in r if x.impl == TORCHJD), None)
                progress(f"  T = {T} {m}: floor {r[0].ms:.1f} ms (min {r[0].ms_min:.1f}), "
                         f"gradops {g.x_floor:.2f}x (paired {g.x_floor_paired:.2f}x, "
                         f"min/min {g.x_floor_min:.2f}x)"
                         + (f", TorchJD {t.x_floor:.2f}x ({t.x_floor_min:.2f}x)" if t else "")
                         + f" ({g.rounds} rounds, load {g.load_1min:.2f})")
    return rows, notes


# --- output ------------------------------------------------------------------------------------
def format_mtl_table(rows: Sequence[MTLRow]) -> str:
    """One line per (T, method): the floor, gradops, TorchJD (and EW's reference lines).
    Cells: median ms per step (its median over the floor's median in the same run; the median
    of the per-round ratios to the floor, "paired"); "min/min": the fastest step over the
    fastest floor step of the same run (the least disturbed by other load)."""
    head = ("| T | method | floor (T backward) | gradops | TorchJD | gradops, min/min | "
            "TorchJD, min/min | TorchJD aggregator |\n|---:|---|---:|---:|---:|---:|---:|---|")
    by = {}
    for r in rows:
        by.setdefault((r.T, r.method), {})[r.impl] = r
    body = []
    for (T, m), d in by.items():
        fl, g, jd = d[FLOOR], d.get(GRADOPS), d.get(TORCHJD)
        cell = (lambda r: f"{r.ms:.1f} ({r.x_floor:.2f}x; {r.x_floor_paired:.2f}x)" if r else "—")
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



def main(args: argparse.Namespace) -> int:
    """``gradops bench --suite mtl``: one training step of a 4-layer MLP (4.2M shared params)
    with T heads, every method: gradops vs T plain backward passes (the floor) vs TorchJD."""
    device = torch.device(args.device)
    Ts = parse_ints(args.T or "3,8,40")
    methods = [x.strip() for x in args.methods.split(",") if x.strip()] if args.methods \
        else list(METHODS)
    methods = [_canonical(x) for x in methods]
    bad = [x for x in methods if x not in METHODS]
    if bad:
        print(f"gradops bench --suite mtl: unknown method(s) {bad}; valid: "
              f"{', '.join(METHODS)}", file=sys.stderr)
        return 2
    T_breakdown = parse_ints(args.breakdown_at) if getattr(args, "breakdown_at", None) else \
        [8 if 8 in Ts else Ts[0]]
    if getattr(args, "breakdown", False) and not set(T_breakdown) <= set(Ts):
        print(f"gradops bench --suite mtl: --breakdown-at {args.breakdown_at} must be among "
              f"--T {','.join(map(str, Ts))}", file=sys.stderr)
        return 2
    width = 256 if args.quick else 1024
    encoder = getattr(args, "encoder", "mlp")
    omp = os.environ.get("OMP_WAIT_POLICY", "(unset; PASSIVE advised on a shared machine)")
    desc = make_setup(Ts[0], "cpu", width=width, encoder=encoder).describe()
    print(f"gradops bench --suite mtl: device {device_name(device)}, fp32, {desc}, T in {Ts}, "
          f"SGD, {datetime.date.today()}, OMP_WAIT_POLICY={omp}, load {load_average():.2f}",
          flush=True)
    if getattr(args, "memory", False):
        mem_methods = [m for m in methods if m != "ew"] if args.methods else list(MEM_METHODS)
        with use_backend(args.backend):
            rows, notes = bench_memory(Ts, mem_methods, encoder=encoder, device=str(device),
                                       progress=lambda line: print(line, flush=True))
        return emit(format_memory_table(rows), notes, rows, args.csv, device, args.append)
    with use_backend(args.backend):
        rows, notes = bench_mtl(Ts, methods, device=str(device), width=width,
                                rounds=args.rounds, budget_s=args.budget, encoder=encoder,
                                progress=lambda line: print(line, flush=True))
        emit(format_mtl_table(rows), notes, rows, args.csv, device, args.append)
        if args.breakdown:
            stages = []
            for T_b in T_breakdown:
                s_b = make_setup(T_b, device, width=width, encoder=encoder)
                stages += breakdown_case(s_b, methods, rounds=args.rounds, budget_s=args.budget)
                if any(r.impl == GRADOPS_BUFFER and r.T == T_b for r in rows):   # the J path
                    stages += breakdown_case(s_b, methods, rounds=args.rounds,
                                             budget_s=args.budget, linear_gram="off")
            Tb = ", ".join(map(str, T_breakdown))
            print(f"\ngradops step breakdown, T = {Tb} (stages timed one by one, synced):\n")
            print(format_stage_table(stages))
            print("\nThe steps that went through J: their Gram and combine stages alone, "
                  "against the floor step (each reads all of J, so a step that computes the "
                  "exact Gram from J costs at least the floor's passes plus these):\n")
            print(format_pass_table(stages))
            if args.csv:
                path = (args.csv[:-4] if args.csv.endswith(".csv") else args.csv) + \
                    "_breakdown.csv"
                write_csv(stages, path, device, args.append)
                print(f"wrote {path}")
    return 0
