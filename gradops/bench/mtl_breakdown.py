"""``gradops bench --suite mtl --breakdown``: gradops' training step split into its stages
(forward, the ``T`` backward passes into the ``[T, P]`` buffer, Gram, weights, combine, optimizer
step), timed one by one with a device sync around each, beside the floor's ``T`` backward
passes."""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .models import MTLSetup
from .mtl_steps import floor_step, gradops_optimizer, gradops_step
from .timing import device_name, sync

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
    ("gradops.optim.mtl", "per_task_backward",
     "T per-task backward passes (into J; D_t for the Linear engine)"),
    ("gradops.optim.mtl", "gram", "gram (one pass over J)"),
    ("gradops.optim.mtl", "segment_gram", "segment_gram (per-layer Grams, one pass)"),
    ("gradops.optim.mtl", "engine_gram", "Gram (Linear engine, + J's other columns)"),
    ("gradops.optim.mtl", "engine_layer_grams",
     "per-layer Grams (Linear engine, + J's other columns)"),
    ("gradops.optim.mtl", "combine", "combine (w^T J into .grad, one pass)"),
    ("gradops.metrics", "conflict_incidence", "conflict_incidence (T x T)"),
)


_METHOD_STAGES = (
    ("_combine_with", "combine (Linear engine, + J's other columns) into .grad"),
    ("_weighted_backward", "one backward of the weighted loss sum"),
    ("_weights_from", "weights (T x T solve)"),
    ("_stats.accumulate", "statistics accumulation"),
)


# the stages of the J path that read all of J after the backward passes: what any method computing
# the exact Gram from J pays beyond the floor's passes
_J_GRAM_STAGES = frozenset(label for _, a, label in _MODULE_STAGES if a in ("gram", "segment_gram"))
_J_COMBINE_STAGES = frozenset(label for _, a, label in _MODULE_STAGES if a == "combine")


def _timed(fn: Callable, label: str, out: dict[str, float], device: torch.device,
           depth: list[int]) -> Callable:
    """``fn``, timed (with a device sync around it) into ``out[label]``; a call made inside
    another timed call counts for the outer one only (``depth`` is shared by one step's timers)."""
    def call(*args, **kwargs):
        if depth[0]:
            return fn(*args, **kwargs)
        depth[0] += 1
        try:
            sync(device)
            t0 = time.perf_counter()
            res = fn(*args, **kwargs)
            sync(device)
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
    for path, label in _METHOD_STAGES:          # "attr" of the optimizer, or "member.attr"
        *members, attr = path.split(".")
        obj = opt
        for name in members:
            obj = getattr(obj, name, None)
        if obj is not None and hasattr(obj, attr):
            setattr(obj, attr, _timed(getattr(obj, attr), label, out, dev, depth))
            patched.append((obj, attr, None, True))
    try:
        sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        losses = s.losses(outs)
        sync(dev)
        t1 = time.perf_counter()
        opt.backward(losses)
        sync(dev)
        t2 = time.perf_counter()
        opt.step()
        sync(dev)
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
    sync(dev)
    t0 = time.perf_counter()
    inner.zero_grad(set_to_none=True)
    _, outs = model(s.x)
    losses = s.losses(outs)
    sync(dev)
    t1 = time.perf_counter()
    for t, loss in enumerate(losses):
        loss.backward(retain_graph=t < s.T - 1)
    sync(dev)
    t2 = time.perf_counter()
    inner.step()
    sync(dev)
    t3 = time.perf_counter()
    return {"forward + losses": t1 - t0, "T backward passes": t2 - t1,
            "optimizer step": t3 - t2}


def breakdown_case(s: MTLSetup, methods: Sequence[str], rounds: int = 10,
                   budget_s: float = 20.0, linear_gram: str = "auto") -> list[StageRow]:
    """gradops' step split into stages, per method, interleaved with the floor's stages (round by
    round), plus both whole steps timed in the same rounds. Medians; ``x_floor`` is each stage
    over the whole floor step. With ``linear_gram="off"`` the methods' rows are named
    ``"<method> (J path)"``."""
    dev = s.device
    contenders = {}
    for m in methods:
        model, inner = s.fresh()
        contenders[m] = (gradops_optimizer(s, m, model, inner, linear_gram=linear_gram), model)
    fmodel, finner = s.fresh()
    whole_floor = floor_step(s)
    whole = {m: gradops_step(s, m, linear_gram=linear_gram) for m in methods}
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
        sync(dev)
        t0 = time.perf_counter()
        whole_floor()
        sync(dev)
        step_t["floor"].append(time.perf_counter() - t0)
        for m, (opt, model) in contenders.items():
            for name, sec in _stage_times(opt, model, s).items():
                stage[m].setdefault(name, []).append(sec)
            sync(dev)
            t0 = time.perf_counter()
            whole[m]()
            sync(dev)
            step_t[m].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    floor = statistics.median(step_t["floor"])
    rows = []
    for m in ["floor", *methods]:
        whole_m = statistics.median(step_t[m])
        label = m if m == "floor" or linear_gram != "off" else f"{m} (J path)"
        for name, v in stage[m].items():
            med = statistics.median(v)
            rows.append(StageRow(method=label, stage=name, T=s.T, ms=med * 1e3,
                                 share=med / whole_m, x_floor=med / floor,
                                 device=device_name(dev)))
        rows.append(StageRow(method=label, stage="whole step (timed apart)", T=s.T,
                             ms=whole_m * 1e3, share=1.0, x_floor=whole_m / floor,
                             device=device_name(dev)))
    return rows


def format_stage_table(rows: Sequence[StageRow]) -> str:
    head = ("| method | stage | ms | share of its step | x floor step |\n"
            "|---|---|---:|---:|---:|")
    body = [f"| {r.method} | {r.stage} | {r.ms:.2f} | {r.share:.2f} | {r.x_floor:.3f} |"
            for r in rows]
    return "\n".join([head, *body])


def format_pass_table(rows: Sequence[StageRow]) -> str:
    """Per method and ``T`` whose step went through ``J`` (``linear_gram="off"``, or a step in
    which the Linear engine took no layer): its Gram stage and its combine stage over the floor
    step (each the median of its rounds), their sum, and the whole step over the floor. Both
    stages read all of ``J`` (at large ``T`` the Gram is bound by arithmetic instead), so the sum
    is the least any method computing the exact Gram from ``J`` adds to the floor's passes on the
    machine it ran on. Empty when no step went through ``J``."""
    acc: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r.method == "floor":
            continue
        a = acc.setdefault((r.method, r.T), [0.0, 0.0, float("nan"), 0.0])
        if r.stage in _J_GRAM_STAGES:
            a[0] += r.x_floor
            a[3] = 1.0
        elif r.stage in _J_COMBINE_STAGES:
            a[1] += r.x_floor
            a[3] = 1.0
        elif r.stage == "whole step (timed apart)":
            a[2] = r.x_floor
    head = ("| method | T | Gram, x floor step | combine | Gram + combine | whole step |\n"
            "|---|---:|---:|---:|---:|---:|")
    body = [f"| {m} | {T} | {g:.3f} | {c:.3f} | {g + c:.3f} | {w:.2f}x |"
            for (m, T), (g, c, w, via_j) in acc.items() if via_j]
    return "\n".join([head, *body])
