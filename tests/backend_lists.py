"""The backends the tests run on, shared by tests/conftest.py's fixtures and the test modules'
parametrizations.

A module of its own rather than ``from conftest import ...``: pytest imports every
``conftest.py`` under the module name ``conftest``, so once tests/train/conftest.py is imported,
``conftest`` is that one for every test module collected after it. gradops is imported here only
after tests/conftest.py has set ``TRITON_INTERPRET`` (pytest always loads it first).
"""
import os

from gradops import _backend


def cpu_backends() -> list[str]:
    """Backends the tests run on CPU tensors: the C++ kernels (required unless the build was
    skipped on purpose with GRADOPS_NO_EXT=1), the torch reference, and Triton when interpreted."""
    names = ["torch"]
    if os.environ.get("GRADOPS_NO_EXT", "0") != "1":
        names.append("cpp")  # a missing extension then fails the tests, as it should
    if _backend.triton_interpret() and _backend.triton_importable()[0]:
        names.append("triton")
    return names


def gpu_backends() -> list[str]:
    names = ["torch", "triton"]
    if _backend.cuda_ext_available():
        names.append("cuda")
    return names
