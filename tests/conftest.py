"""Shared test set-up.

Without a visible GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set
before gradops (and so the ``@triton.jit`` kernels) is imported, which is why it happens here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import gradops  # noqa: E402,F401
from backend_lists import cpu_backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=cpu_backends())
def cpu_backend(request):
    with gradops.use_backend(request.param):
        yield request.param


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """The device a test's tensors live on: ``cpu`` always, and ``cuda`` (marked ``gpu``: reported
    as skipped without a CUDA device, selected by ``pytest -m gpu``)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _restore_num_threads():
    """Tests that pin ``torch.set_num_threads`` (the trainer's ``threads=``, single-thread timing
    checks) must not change the summation order of the tests that run after them."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
