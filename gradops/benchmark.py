"""Quick benchmark of gradops' ops against the implementations people use today.

``gradops bench`` (and ``benchmarks/bench_gram.py`` for pytest-benchmark) time, side by side in
one run, interleaved round by round so that machine noise hits every contender alike:

* ``gram``: gradops vs ``J @ J.T`` (cuBLAS / MKL) vs a Python loop over task pairs with a host
  sync per pair (what Recon's and LibMTL's code do);
* ``segment_gram``: gradops vs a loop of per-segment matmuls vs Recon's per-layer pair loop;
* ``combine``: gradops vs ``w @ J``;
* ``pcgrad``: gradops (Gram pass + on-device recurrence + combine pass) vs the vector form with a
  host sync per pair (LibMTL, the paper) vs TorchJD's ``PCGrad`` aggregator (when installed);
* ``graddrop``: gradops (one fused pass) vs TorchJD's ``GradDrop`` aggregator (when installed) vs
  the plain torch formula;
* the memory floor: one read of ``J`` (a flat ``J.sum()``; ``J.sum(0)`` beside it).

Each row reports the median time, the bytes of ``J`` read per second, and the time as a multiple
of the one-read floor, the faster of a flat ``J.sum()`` and the column sum ``J.sum(0)`` measured in
the same run (quote ratios measured in one run, not absolute times).
"""
from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .ops.combine import combine
from .ops.graddrop import graddrop
from .ops.gram import gram, segment_gram
from .ops.pcgrad import pcgrad, random_orders
from .reference import graddrop_reference, pcgrad_reference
from .segments import offsets_from_numels


# --- the peers ---------------------------------------------------------------------------------
def one_read(J: torch.Tensor) -> torch.Tensor:
    """The memory floor of any one-pass op: read every element of ``J`` once, as a flat reduction
    over contiguous memory (the fastest read torch offers; ``J.sum(0)``, the column sum, is
    much slower on CPU for small and large T and would flatter the ratios)."""
    return J.reshape(-1).sum()


def column_sum(J: torch.Tensor) -> torch.Tensor:
    """``J.sum(0)``: a one-pass column reduction; the floor is the faster of this and
    :func:`one_read`."""
    return J.sum(0)


FLOOR = "one read (flat J.sum())"


def matmul_gram(J: torch.Tensor) -> torch.Tensor:
    """``J @ J.T`` in fp32 (what TorchJD's Gramian-based aggregators compute)."""
    X = J if J.dtype == torch.float32 else J.float()
    return X @ X.T


def pair_loop_gram(J: torch.Tensor) -> torch.Tensor:
    """A Python loop over task pairs, one dot product and one host sync per pair (LibMTL/Recon)."""
    T = J.shape[0]
    G = torch.empty(T, T)
    for i in range(T):
        for j in range(i, T):
            G[i, j] = G[j, i] = float(torch.dot(J[i].float(), J[j].float()))
    return G


def segment_matmul_loop(J: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One matmul per segment (the obvious vectorised per-layer Gram)."""
    bounds = offsets.tolist()
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        X = J[:, a:b].float()
        out.append(X @ X.T)
    return torch.stack(out)


def segment_pair_loop(J: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Recon's per-layer statistics: for each layer, a Python loop over task pairs with a host
    sync per pair and layer."""
    bounds = offsets.tolist()
    T = J.shape[0]
    out = torch.empty(len(bounds) - 1, T, T)
    for l, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        X = J[:, a:b].float()
        for i in range(T):
            for j in range(i, T):
                out[l, i, j] = out[l, j, i] = float(torch.dot(X[i], X[j]))
    return out


def torchjd_aggregators() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """TorchJD's PCGrad and GradDrop aggregators, if torchjd is installed (else empty)."""
    try:
        from torchjd import aggregation
    except ImportError:
        return {}
    return {"pcgrad": aggregation.PCGrad(), "graddrop": aggregation.GradDrop()}


def torch_graddrop(J: torch.Tensor) -> torch.Tensor:
    """GradDrop written as plain torch ops (several full-size temporaries)."""
    noise = torch.rand(J.shape[1], device=J.device)
    return graddrop_reference(J, torch.zeros(J.shape[0], device=J.device), noise)[0]


# --- timing ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    op: str
    impl: str
    T: int
    P: int
    L: int
    dtype: str
    device: str
    ms: float
    gbps: float
    x_read: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int,
                      budget_s: float = 20.0) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round.

    One warm-up call each first; stops early (with at least 3 rounds) when ``budget_s`` is spent.
    """
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def equal_offsets(P: int, L: int) -> torch.Tensor:
    """``L`` segments of (nearly) equal size covering ``P`` columns."""
    base, extra = divmod(P, L)
    return offsets_from_numels([base + (1 if i < extra else 0) for i in range(L)])


def bench_case(T: int, P: int, L: int, dtype: torch.dtype, device: torch.device, rounds: int = 15,
               pair_loops: bool = True, budget_s: float = 20.0) -> list[Row]:
    """Time every contender for one shape; returns one :class:`Row` per (op, implementation)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    J = torch.randn(T, P, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    offsets = equal_offsets(P, L)
    fns: dict[str, Callable[[], object]] = {
        FLOOR: lambda: one_read(J),
        "column sum (J.sum(0))": lambda: column_sum(J),
        "gram: gradops": lambda: gram(J),
        "gram: J @ J.T": lambda: matmul_gram(J),
        "segment_gram: gradops": lambda: segment_gram(J, offsets),
        "segment_gram: matmul per segment": lambda: segment_matmul_loop(J, offsets),
    }
    if pair_loops:
        fns["gram: pair loop (LibMTL/Recon)"] = lambda: pair_loop_gram(J)
        fns["segment_gram: pair loop per layer (Recon)"] = lambda: segment_pair_loop(J, offsets)
    return _rows(fns, J, L, device, rounds, budget_s)


def bench_methods_case(T: int, P: int, dtype: torch.dtype, device: torch.device,
                       rounds: int = 15, vector_form: bool = True,
                       budget_s: float = 20.0) -> list[Row]:
    """Time combine, PCGrad and GradDrop against their peers for one shape."""
    g = torch.Generator(device="cpu").manual_seed(0)
    J = torch.randn(T, P, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    w = torch.randn(T, generator=g).to(device)
    perms = random_orders(T, generator=g, device=device)
    fns: dict[str, Callable[[], object]] = {
        FLOOR: lambda: one_read(J),
        "column sum (J.sum(0))": lambda: column_sum(J),
        "combine: gradops": lambda: combine(J, w),
        "combine: w @ J": lambda: w.to(J.dtype) @ J,
        "pcgrad: gradops": lambda: pcgrad(J, perms=perms),
        "graddrop: gradops": lambda: graddrop(J),
        "graddrop: torch formula": lambda: torch_graddrop(J),
    }
    if vector_form:
        fns["pcgrad: vector form, sync per pair (LibMTL)"] = lambda: pcgrad_reference(J, perms)
    jd = torchjd_aggregators()
    if jd and dtype == torch.float32:
        fns["pcgrad: TorchJD PCGrad"] = lambda: jd["pcgrad"](J)
        fns["graddrop: TorchJD GradDrop"] = lambda: jd["graddrop"](J)
    return _rows(fns, J, 1, device, rounds, budget_s)


def _rows(fns, J, L, device, rounds, budget_s) -> list[Row]:
    secs = time_side_by_side(fns, device, rounds, budget_s)
    nbytes = J.numel() * J.element_size()
    floor = min(secs[FLOOR], secs["column sum (J.sum(0))"])
    rows = []
    for name, s in secs.items():
        op, _, impl = name.partition(": ") if ": " in name else ("read", "", name)
        rows.append(Row(op=op, impl=impl, T=J.shape[0], P=J.shape[1],
                        L=L if op == "segment_gram" else 1,
                        dtype=str(J.dtype).replace("torch.", ""), device=device_name(device),
                        ms=s * 1e3, gbps=nbytes / s / 1e9, x_read=s / floor))
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_rows(rows: Sequence[Row]) -> str:
    """A Markdown table of benchmark rows."""
    head = ("| op | implementation | T | P | L | dtype | ms | GB/s of J | x one read |\n"
            "|---|---|---:|---:|---:|---|---:|---:|---:|")
    body = [f"| {r.op} | {r.impl} | {r.T} | {r.P:,} | {r.L} | {r.dtype} | {r.ms:.2f} | "
            f"{r.gbps:.1f} | {r.x_read:.2f} |" for r in rows]
    return "\n".join([head, *body])


def write_csv(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].as_dict()))
        w.writeheader()
        for r in rows:
            w.writerow(r.as_dict())
