"""Fixtures of the pytest-benchmark files (the runner is in ``_runner.py``)."""
from __future__ import annotations

import pytest
from _runner import DEVICE, P


@pytest.fixture(scope="module", params=[2, 8, 40], ids=lambda t: f"T={t}")
def J(request):
    """The suites' ``J`` ``[T, P]`` for T = 2, 8, 40."""
    from gradops.bench.gram import random_J
    return random_J(request.param, P, device=DEVICE)
