"""pytest-benchmark suite for the Gram family (not part of the test run).

    .venv/bin/python -m pytest benchmarks/bench_gram.py --benchmark-only \
        --benchmark-group-by=param:T --benchmark-columns=median,iqr,rounds

Compares gradops against ``J @ J.T``, per-segment matmul loops and the one-read floor
(a flat ``J.sum()``) on the same tensor in one run. ``GRADOPS_BENCH_P`` sets P (default 4,194,304);
``GRADOPS_BENCH_DEVICE=cuda`` runs on a GPU. For a single table with GB/s and ratios to the floor,
use ``gradops bench``.
"""
from __future__ import annotations

import os

import pytest
import torch

import gradops
from gradops.bench import peers
from gradops.bench.gram import equal_offsets

P = int(float(os.environ.get("GRADOPS_BENCH_P", 4_194_304)))
DEVICE = torch.device(os.environ.get("GRADOPS_BENCH_DEVICE", "cpu"))
SEGMENTS = 100


@pytest.fixture(scope="module", params=[2, 8, 40], ids=lambda t: f"T={t}")
def J(request):
    g = torch.Generator().manual_seed(0)
    return torch.randn(request.param, P, generator=g).to(DEVICE)


def _run(bench, fn, *args):
    def call():
        out = fn(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out
    bench.pedantic(call, rounds=10, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", ["one_read", "gradops.gram", "J@J.T"])
def test_gram(benchmark, J, impl):
    fn = {"one_read": peers.one_read, "gradops.gram": gradops.gram,
          "J@J.T": peers.matmul_gram}[impl]
    benchmark.extra_info["bytes"] = J.numel() * J.element_size()
    _run(benchmark, fn, J)


@pytest.mark.parametrize("impl", ["gradops.segment_gram", "matmul per segment"])
def test_segment_gram(benchmark, J, impl):
    offsets = equal_offsets(J.shape[1], SEGMENTS)
    fn = {"gradops.segment_gram": gradops.segment_gram,
          "matmul per segment": peers.segment_matmul_loop}[impl]
    benchmark.extra_info["bytes"] = J.numel() * J.element_size()
    _run(benchmark, fn, J, offsets)
