"""``gradops bench --suite mtl --memory``: the peak memory of one training step per contender, in
copies of the per-task Jacobian ``J`` (``T x P`` shared parameters in the parameters' dtype).

Each contender (the floor: ``T`` plain backward passes; MTLOptimizer; TorchJD) runs in a fresh
subprocess, so that no contender inherits another's allocator state:

1. run two steps of the same contender on a small copy of the model (batch 2; a 64-wide MLP),
   so that the code it runs is resident, drop it; build the model and the contender, run one
   forward under ``no_grad``, ``gc.collect()`` and ``malloc_trim(0)``;
2. record the baseline: on CPU the resident set (``VmRSS``), after resetting the peak
   (``/proc/self/clear_refs``); on CUDA ``torch.cuda.memory_allocated`` after
   ``reset_peak_memory_stats``;
3. run ``steps`` training steps (the first allocates the contender's persistent buffers, e.g.
   ``J``) and read the peak: ``VmHWM`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

The result is the peak minus the baseline: what the step holds at its fullest (activations and
graph, gradients, per-task buffers and temporaries). On CPU the subprocess runs with glibc's
mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so that every tensor larger than
that is mapped on allocation and unmapped on free: the resident set then follows the live
tensors instead of what the allocator keeps cached (with the default, dynamic threshold, freed
gradient-sized blocks stay in the heap and the peak depends on the order of frees).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import torch

from .models import make_setup
from .mtl_steps import floor_step, gradops_step, torchjd_step
from .peers import torchjd_aggregator
from .timing import device_name

FLOOR = "floor: T backward passes + step"

_MMAP_THRESHOLD = str(64 * 1024)

METHODS = ("pcgrad", "mgda", "pcgrad-layer", "gradvac", "graddrop")
"""The methods measured by default (their buffers differ: whole-model Gram, per-layer Grams,
GradDrop's pass)."""


@dataclasses.dataclass
class MemoryRow:
    encoder: str
    T: int
    method: str
    impl: str
    shared_params: int
    J_mb: float            # T x P x element size, MB
    peak_mb: float         # peak minus baseline, MB
    copies_of_J: float     # peak_mb / J_mb
    extra_over_floor: float  # (peak - the floor's peak) / J, in copies of J
    held_mb: float         # what stays allocated after the steps (persistent buffers), MB
    device: str
    allocator: str
    note: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- in the subprocess --------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim() -> None:
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _contender(kind: str, method: str, s, linear_gram: str) -> Callable[[], None]:
    if kind == "floor":
        return floor_step(s)
    if kind == "gradops":
        return gradops_step(s, method, linear_gram=linear_gram, shared_as="params")
    if kind == "torchjd":
        agg, label = torchjd_aggregator(method, s.T)
        if agg is None:
            raise LookupError(label)
        return torchjd_step(s, agg)
    raise ValueError(f"unknown contender {kind!r}")


def measure(kind: str, method: str, T: int, encoder: str, device: str, steps: int = 3,
            linear_gram: str = "off", width: int = 1024, depth: int = 4) -> dict:
    """Peak and held bytes over ``steps`` training steps of one contender (in this process: the
    caller is the fresh subprocess)."""
    dev = torch.device(device)
    # warm-up on a small copy (batch 2, narrow MLP) of the same contender: the code it runs
    # (libraries' pages, kernel caches, thread pools) is resident before the baseline
    w = make_setup(T, dev, encoder=encoder, width=min(width, 64), depth=depth, batch=2)
    warm = _contender(kind, method, w, linear_gram)
    for _ in range(2):
        warm()
    del warm, w
    s = make_setup(T, dev, encoder=encoder, width=width, depth=depth)
    step = _contender(kind, method, s, linear_gram)
    with torch.no_grad():
        step.model(s.x)  # type: ignore[attr-defined]
    _trim()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        held = torch.cuda.memory_allocated(dev) - base
    else:
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                     # reset VmHWM to the current resident set
        for _ in range(steps):
            step()
        peak = (_status_kib("VmHWM") - base) * 1024
        _trim()
        held = (_status_kib("VmRSS") - base) * 1024
    elt = next(s.model.encoder.parameters()).element_size()
    return {"peak": peak, "held": held, "J": T * s.shared_params * elt,
            "shared_params": s.shared_params}


def _worker(spec: str) -> int:
    args = json.loads(spec)
    torch.set_num_threads(int(args.pop("threads")))
    try:
        out = measure(**args)
    except LookupError as e:
        out = {"skipped": str(e)}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --- the driver ---------------------------------------------------------------------------------
def run_contender(kind: str, method: str, T: int, encoder: str = "mlp", device: str = "cpu",
                  steps: int = 3, linear_gram: str = "off", width: int = 1024,
                  depth: int = 4) -> dict:
    """:func:`measure` in a fresh subprocess: ``{"peak", "held", "J", "shared_params"}`` in
    bytes (or ``{"skipped": why}``). ``kind``: ``"floor"``, ``"gradops"`` or ``"torchjd"``."""
    spec = json.dumps({"kind": kind, "method": method, "T": T, "encoder": encoder,
                       "device": device, "steps": steps, "linear_gram": linear_gram,
                       "width": width, "depth": depth, "threads": torch.get_num_threads()})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=_MMAP_THRESHOLD)
    proc = subprocess.run([sys.executable, "-m", "gradops.bench.mtl_memory", spec], env=env,
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"mtl memory worker {kind}/{method}/T={T} failed "
                           f"(rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def bench_memory(Ts: Sequence[int], methods: Sequence[str] = METHODS, encoder: str = "mlp",
                 device: str = "cpu", steps: int = 3, torchjd: bool = True,
                 progress: Callable[[str], None] | None = None
                 ) -> tuple[list[MemoryRow], list[str]]:
    """Every (T, contender) of the memory table; rows and notes (skipped contenders)."""
    rows: list[MemoryRow] = []
    notes: list[str] = []
    dev = torch.device(device)
    alloc = "torch.cuda caching allocator (allocated bytes)" if dev.type == "cuda" else \
        f"glibc, MALLOC_MMAP_THRESHOLD_={_MMAP_THRESHOLD} (resident set)"
    for T in Ts:
        floor = run_contender("floor", "ew", T, encoder, device, steps)
        J = floor["J"]

        def row(method: str, impl: str, r: dict, note: str = "") -> MemoryRow:
            return MemoryRow(encoder=encoder, T=T, method=method, impl=impl,
                             shared_params=r["shared_params"], J_mb=J / 1e6,
                             peak_mb=r["peak"] / 1e6, copies_of_J=r["peak"] / J,
                             extra_over_floor=(r["peak"] - floor["peak"]) / J,
                             held_mb=r["held"] / 1e6, device=device_name(dev), allocator=alloc,
                             note=note)
        rows.append(row("-", FLOOR, floor))
        contenders = [("gradops", m, "off") for m in methods]
        if encoder == "mlp":                          # the Linear engine, for comparison
            contenders.append(("gradops", "pcgrad", "auto"))
        if torchjd:
            contenders += [("torchjd", m, "") for m in methods if m != "pcgrad-layer"]
        for kind, m, lg in contenders:
            r = run_contender(kind, m, T, encoder, device, steps, lg or "off")
            if "skipped" in r:
                notes.append(f"{kind} {m}, T = {T}: {r['skipped']}")
                continue
            impl = (f"gradops MTLOptimizer (linear_gram={lg!r}, shared= a list of parameters)"
                    if kind == "gradops" else "TorchJD mtl_backward + jac_to_grad")
            rows.append(row(m, impl, r))
            if progress is not None:
                progress(f"  T = {T} {kind} {m} {lg}: peak {r['peak'] / 1e6:.1f} MB = "
                         f"{r['peak'] / J:.2f} J (floor {floor['peak'] / J:.2f} J)")
    return rows, notes


def format_memory_table(rows: Sequence[MemoryRow]) -> str:
    head = ("| encoder | T | method | contender | J (MB) | peak (MB) | peak (copies of J) | "
            "beyond the floor (copies of J) | held between steps (MB) |\n"
            "|---|---:|---|---|---:|---:|---:|---:|---:|")
    body = [f"| {r.encoder} | {r.T} | {r.method} | {r.impl} | {r.J_mb:.1f} | {r.peak_mb:.1f} | "
            f"{r.copies_of_J:.2f} | {r.extra_over_floor:+.2f} | {r.held_mb:.1f} |" for r in rows]
    return "\n".join([head, *body])


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
