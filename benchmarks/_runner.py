"""The shared runner of the pytest-benchmark files: one timed call per round, synced on CUDA.

Environment: ``GRADOPS_BENCH_DEVICE`` (default ``cpu``), ``GRADOPS_BENCH_P`` (columns of ``J``,
default 4,194,304). The contenders themselves come from :mod:`gradops.bench` (the same calls
``gradops bench`` times), so that each file here only picks a suite.
"""
from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("GRADOPS_BENCH_DEVICE", "cpu"))
P = int(float(os.environ.get("GRADOPS_BENCH_P", 4_194_304)))


def run(benchmark, fn, rounds: int = 10) -> None:
    """Time ``fn()`` with ``benchmark.pedantic`` (one warm-up, ``rounds`` rounds, synced)."""
    def call():
        out = fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
