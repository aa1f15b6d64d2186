"""``gradops bench --suite gram``: ``gram`` and ``segment_gram`` against ``J @ J.T``, a matmul per
segment and the Python pair loops of LibMTL and Recon, beside the one-read floor."""
from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable

import torch

from .._backend import use_backend
from ..ops.gram import gram, segment_gram
from ..segments import offsets_from_numels
from .peers import (FLOOR, column_sum, matmul_gram, one_read, pair_loop_gram,
                    segment_matmul_loop, segment_pair_loop)
from .report import Row, emit, format_rows, op_rows
from .timing import device_name


def equal_offsets(P: int, L: int) -> torch.Tensor:
    """``L`` segments of (nearly) equal size covering ``P`` columns."""
    base, extra = divmod(P, L)
    return offsets_from_numels([base + (1 if i < extra else 0) for i in range(L)])


def contenders(J: torch.Tensor, offsets: torch.Tensor, pair_loops: bool = True
               ) -> dict[str, Callable[[], object]]:
    """``{"op: implementation": call}`` for one ``J`` and segment table: the one-read floor, the
    column sum, gradops' ``gram`` / ``segment_gram``, their matmul peers, and (``pair_loops``) the
    Python pair loops of LibMTL and Recon. ``benchmarks/bench_gram.py`` times the same calls."""
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
    return fns


def random_J(T: int, P: int, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """The suites' ``J``: standard normal ``[T, P]`` from a fixed seed."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(T, P, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def bench_case(T: int, P: int, L: int, dtype: torch.dtype, device: torch.device, rounds: int = 15,
               pair_loops: bool = True, budget_s: float = 20.0) -> list[Row]:
    """Time every contender for one shape; returns one :class:`Row` per (op, implementation)."""
    J = random_J(T, P, dtype, device)
    return op_rows(contenders(J, equal_offsets(P, L), pair_loops), J, L, device, rounds, budget_s)


def header(args: argparse.Namespace, suite: str, P: int, Ts: list[int]) -> str:
    return (f"gradops bench --suite {suite}: device {device_name(torch.device(args.device))}, "
            f"dtype {args.dtype}, P = {P:,}, L = {args.segments} segments, T in {Ts}, "
            f"{datetime.date.today()}")


CaseRows = Callable[[argparse.Namespace, int, int, torch.dtype, torch.device], list[Row]]
"""The rows of one ops suite for ``(args, T, P, dtype, device)``."""


def gram_rows(args: argparse.Namespace, T: int, P: int, dtype: torch.dtype,
              device: torch.device) -> list[Row]:
    """Suite ``gram``'s rows for one ``T``: :func:`bench_case` with the command line's options."""
    return bench_case(T, P, args.segments, dtype, device, rounds=args.rounds,
                      pair_loops=not args.no_pair_loops, budget_s=args.budget)


def run_ops_suites(args: argparse.Namespace, suites: dict[str, CaseRows]) -> int:
    """Run the ops suites ``{name: rows for one T}`` (``gram``, and ``methods`` from
    :mod:`gradops.bench.methods`) for every T: one table."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    P = args.P if args.P else (262_144 if args.quick else 4_194_304)
    Ts = parse_ints(args.T or "2,8,40")
    print(header(args, "+".join(suites), P, Ts), flush=True)
    rows: list[Row] = []
    with use_backend(args.backend):
        for T in Ts:
            for case_rows in suites.values():
                rows += case_rows(args, T, P, dtype, device)
            print(f"  T = {T} done", flush=True)
    return emit(format_rows(rows), [], rows, args.csv, device, args.append)


def main(args: argparse.Namespace) -> int:
    """``gradops bench --suite gram``."""
    return run_ops_suites(args, {"gram": gram_rows})


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_ints(text: str) -> list[int]:
    """``"2,8,40"`` -> ``[2, 8, 40]`` (``"1e3"`` is accepted)."""
    return [int(float(x)) for x in text.split(",") if x]
