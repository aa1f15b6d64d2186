"""pytest-benchmark suite for the Gram family (not part of the test run).

    .venv/bin/python -m pytest benchmarks/bench_gram.py --benchmark-only \
        --benchmark-group-by=param:J --benchmark-columns=median,iqr,rounds

The contenders of ``gradops bench --suite gram`` (:func:`gradops.bench.gram.contenders`):
gradops' ``gram`` / ``segment_gram`` against ``J @ J.T``, a matmul per segment and the one-read
floor, on the same tensor (the Python pair loops are left to ``gradops bench``: seconds per
call at T = 40). For one table with GB/s and ratios to the floor, use ``gradops bench``.
"""
from __future__ import annotations

import pytest
from _runner import run

from gradops.bench.gram import contenders, equal_offsets

SEGMENTS = 100
NAMES = ["read: one read (flat J.sum())", "gram: gradops", "gram: J @ J.T",
         "segment_gram: gradops", "segment_gram: matmul per segment"]


@pytest.mark.parametrize("name", NAMES)
def test_gram_family(benchmark, J, name):
    fns = contenders(J, equal_offsets(J.shape[1], SEGMENTS), pair_loops=False)
    fns = {("read: " + k if ": " not in k else k): f for k, f in fns.items()}
    benchmark.extra_info["bytes"] = J.numel() * J.element_size()
    run(benchmark, fns[name])
