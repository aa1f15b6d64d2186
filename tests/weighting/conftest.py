"""Fixtures of the weighting tests.

pytest imports this file, like every ``conftest.py``, under the module name ``conftest``; no test
imports from ``conftest`` (shared names live in modules of their own: tests/backend_lists.py,
tests/weighting/weighting_helpers.py), so which ``conftest`` was imported last does not matter.
"""
import pytest

import gradops

from backend_lists import cpu_backends

SOLVER_BACKENDS = [b for b in cpu_backends() if b in ("torch", "cpp")]


@pytest.fixture(params=SOLVER_BACKENDS)
def solver_backend(request):
    """Where the iterative solvers' loops run on CPU: the torch reference loop or the C++ kernels
    (csrc/weighting_cpu.cpp; tests/weighting/test_solvers.py compares every backend, Triton too,
    with the torch loops directly)."""
    with gradops.use_backend(request.param):
        yield request.param
