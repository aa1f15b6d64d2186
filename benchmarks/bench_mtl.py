"""pytest-benchmark suite: one multi-task training step, every method (not part of the test run).

    .venv/bin/python -m pytest benchmarks/bench_mtl.py --benchmark-only \
        --benchmark-group-by=param:method --benchmark-columns=median,iqr,rounds

The model of ``gradops bench --suite mtl`` (``gradops/bench/mtl.py``): a 4-layer MLP encoder
with T linear heads, batch 64, MSE losses, plain SGD. Per method: the floor (zero_grad + forward +
T backward passes + step), gradops' ``MTLOptimizer`` step, and TorchJD's ``mtl_backward`` +
``jac_to_grad`` step with the same method's aggregator (skipped where TorchJD lacks it or its
optional solver dependencies). A smoke configuration by default (width 256: 263k shared params,
T = 3); ``GRADOPS_BENCH_WIDTH=1024`` gives the 4.2M-parameter encoder, ``GRADOPS_BENCH_T`` the
task count, ``GRADOPS_BENCH_DEVICE=cuda`` a GPU. pytest-benchmark times the contenders one
after the other; for interleaved timing and ratios to the floor, use ``gradops bench --suite mtl``.
"""
from __future__ import annotations

import os

import pytest
import torch

from gradops.bench import mtl as bm

WIDTH = int(os.environ.get("GRADOPS_BENCH_WIDTH", 256))
T = int(os.environ.get("GRADOPS_BENCH_T", 3))
DEVICE = torch.device(os.environ.get("GRADOPS_BENCH_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def setup():
    return bm.make_setup(T, DEVICE, width=WIDTH)


def _run(benchmark, step, s):
    def call():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    benchmark.extra_info.update(T=s.T, shared_params=s.shared_params, width=s.width)
    benchmark.pedantic(call, rounds=10, warmup_rounds=1, iterations=1)


def test_floor(benchmark, setup):
    """zero_grad + forward + T backward passes + SGD step."""
    _run(benchmark, bm.floor_step(setup), setup)


def test_ew_summed_loss(benchmark, setup):
    """zero_grad + forward + one backward of the summed loss + SGD step."""
    _run(benchmark, bm.sum_step(setup), setup)


@pytest.mark.parametrize("method", bm.METHODS)
def test_gradops(benchmark, setup, method):
    _run(benchmark, bm.gradops_step(setup, method), setup)


@pytest.mark.parametrize("method", [m for m in bm.METHODS if m != "pcgrad-layer"])
def test_torchjd(benchmark, setup, method):
    agg, why = bm.torchjd_aggregator(method, setup.T)
    if agg is None:
        pytest.skip(why)
    benchmark.extra_info["aggregator"] = why
    _run(benchmark, bm.torchjd_step(setup, agg), setup)
