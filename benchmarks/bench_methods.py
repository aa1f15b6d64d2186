"""pytest-benchmark suite for combine, PCGrad and GradDrop (not part of the test run).

    .venv/bin/python -m pytest benchmarks/bench_methods.py --benchmark-only \
        --benchmark-group-by=param:J --benchmark-columns=median,iqr,rounds

The contenders of ``gradops bench --suite methods`` (:func:`gradops.bench.methods.contenders`):
gradops' ``combine`` / ``pcgrad`` / ``graddrop`` against ``w @ J``, the torch formula of GradDrop
and TorchJD's aggregators (when installed), beside the one-read floor. The vector-form PCGrad with
a host sync per pair is left to ``gradops bench`` (seconds per call at T = 40).
"""
from __future__ import annotations

import pytest
from _runner import run

from gradops.bench.methods import contenders, method_inputs

NAMES = ["one read (flat J.sum())", "combine: gradops", "combine: w @ J", "pcgrad: gradops",
         "pcgrad: TorchJD PCGrad", "graddrop: gradops", "graddrop: torch formula",
         "graddrop: TorchJD GradDrop"]


@pytest.mark.parametrize("name", NAMES)
def test_methods(benchmark, J, name):
    fns = contenders(J, *method_inputs(J), vector_form=False)
    if name not in fns:
        pytest.skip(f"{name}: not available here (TorchJD not installed, or not fp32)")
    benchmark.extra_info["bytes"] = J.numel() * J.element_size()
    run(benchmark, fns[name])
