"""``gradops bench --suite methods``: ``combine``, ``pcgrad`` and ``graddrop`` against ``w @ J``,
the vector form of PCGrad with a host sync per pair (LibMTL, the paper), the torch formula of
GradDrop and TorchJD's aggregators, beside the one-read floor; and one row per ``T x T`` solver
(MGDA, CAGrad at ``c`` = 0.4 and 2) on ``G = J J^T``: time per solve and the iterations it took
(in the implementation column)."""
from __future__ import annotations

import argparse
from collections.abc import Callable

import math

import torch

from .. import weighting as W
from ..ops.combine import combine
from ..ops.graddrop import graddrop
from ..ops.pcgrad import pcgrad, random_orders
from ..reference import pcgrad_reference
from .peers import FLOOR, column_sum, one_read, torch_graddrop, torchjd_aggregators
from .gram import gram_rows, random_J, run_ops_suites
from .report import Row, op_rows
from .timing import device_name, time_side_by_side


def contenders(J: torch.Tensor, w: torch.Tensor, perms: torch.Tensor, vector_form: bool = True
               ) -> dict[str, Callable[[], object]]:
    """``{"op: implementation": call}`` for one ``J``: the one-read floor, the column sum,
    gradops' ``combine`` / ``pcgrad`` / ``graddrop`` and their peers (``w @ J``, the torch formula
    of GradDrop, TorchJD's aggregators for fp32 when installed, and with ``vector_form`` the
    vector-form PCGrad with a host sync per pair). ``benchmarks/bench_methods.py`` times the same
    calls."""
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
    if jd and J.dtype == torch.float32:
        fns["pcgrad: TorchJD PCGrad"] = lambda: jd["pcgrad"](J)
        fns["graddrop: TorchJD GradDrop"] = lambda: jd["graddrop"](J)
    return fns


def method_inputs(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random weights ``[T]`` and PCGrad orders ``[T, T]`` on ``J``'s device."""
    g = torch.Generator().manual_seed(1)
    T = J.shape[0]
    return (torch.randn(T, generator=g).to(J.device),
            random_orders(T, generator=g, device=J.device))


SOLVES: dict[str, Callable[[torch.Tensor], object]] = {
    "mgda": lambda G: W.mgda(G, return_status=True),
    "cagrad c=0.4": lambda G: W.cagrad(G, c=0.4, return_status=True),
    "cagrad c=2": lambda G: W.cagrad(G, c=2.0, return_status=True),
}
"""The solver rows: name -> ``G -> (w, status)``."""


def solver_rows(J: torch.Tensor, device: torch.device, rounds: int,
                budget_s: float) -> list[Row]:
    """One row per solver on ``G = J J^T`` (float32): time per solve (the default backend for
    ``G``'s device: C++ on CPU, Triton on CUDA), iterations in the implementation column."""
    G = (J.float() @ J.float().T).contiguous()
    its = {name: int(fn(G)[1].iterations) for name, fn in SOLVES.items()}
    secs = time_side_by_side({name: (lambda fn=fn: fn(G)) for name, fn in SOLVES.items()},
                             device, rounds, budget_s)
    return [Row(op="solve", impl=f"{name}: active set, {its[name]} iterations", T=J.shape[0],
                P=J.shape[1], L=1, dtype="float32", device=device_name(device), ms=s * 1e3,
                gbps=math.nan, x_read=math.nan) for name, s in secs.items()]


def bench_methods_case(T: int, P: int, dtype: torch.dtype, device: torch.device,
                       rounds: int = 15, vector_form: bool = True,
                       budget_s: float = 20.0) -> list[Row]:
    """Time combine, PCGrad and GradDrop against their peers for one shape, and the solvers on
    its Gram."""
    J = random_J(T, P, dtype, device)
    w, perms = method_inputs(J)
    return (op_rows(contenders(J, w, perms, vector_form), J, 1, device, rounds, budget_s)
            + solver_rows(J, device, rounds, budget_s))


def methods_rows(args: argparse.Namespace, T: int, P: int, dtype: torch.dtype,
                 device: torch.device) -> list[Row]:
    """Suite ``methods``' rows for one ``T``: :func:`bench_methods_case` with the command line's
    options."""
    return bench_methods_case(T, P, dtype, device, rounds=args.rounds,
                              vector_form=not args.no_pair_loops, budget_s=args.budget)


def main(args: argparse.Namespace) -> int:
    """``gradops bench --suite methods``."""
    return run_ops_suites(args, {"methods": methods_rows})


def main_all(args: argparse.Namespace) -> int:
    """``gradops bench --suite all``: the suites ``gram`` and ``methods`` in one table."""
    return run_ops_suites(args, {"gram": gram_rows, "methods": methods_rows})
