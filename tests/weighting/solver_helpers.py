"""Cases and comparisons shared by the tests of the weighting solvers' backends (C++, Triton under
the interpreter) against the torch reference loops: tests/weighting/test_solvers.py and the
per-method files (tests/weighting/test_cagrad.py). Why the comparisons are what they are: the
docstring of tests/weighting/test_solvers.py."""
from __future__ import annotations

import torch

import gradops
from gradops import weighting as W

from backend_lists import cpu_backends

SOLVER_BACKENDS = [b for b in ("cpp", "triton") if b in cpu_backends()]
"""The non-reference backends that can run on CPU tensors here (Triton: under the interpreter)."""

TRITON_CASES = ("random_T3", "zero_row")
"""The cases the interpreted Triton solver runs where a test sweeps every case (the interpreter
takes ~0.1 s per active-set iteration): the C++ kernels run them all."""


def _bn(names):
    """``(backend, name)`` pairs: every case for C++, :data:`TRITON_CASES` for Triton."""
    return [(b, n) for b in SOLVER_BACKENDS for n in names if b != "triton" or n in TRITON_CASES]

DTYPES = (torch.float32, torch.float64)


def _jac(T: int, P: int = 256, seed: int = 0, common: float = 0.5) -> torch.Tensor:
    """Task gradients with scales 0.1..3 and a shared component (fp64)."""
    g = torch.Generator().manual_seed(100 * T + seed)
    Z = torch.randn(T, P, generator=g, dtype=torch.float64)
    Z = Z + common * torch.randn(1, P, generator=g, dtype=torch.float64)
    return Z * (0.1 + 2.9 * torch.rand(T, 1, generator=g, dtype=torch.float64))


def _cases() -> dict[str, torch.Tensor]:
    out = {f"random_T{T}": _jac(T) for T in (1, 2, 3, 5, 7, 13, 40, 64)}
    g = torch.Generator().manual_seed(11)
    J = _jac(5, seed=1)
    J[3] = J[1]
    out["duplicate_rows"] = J
    J = _jac(6, seed=2)
    J[2] = 2.0 * J[0]
    J[5] = 0.5 * J[4]
    out["collinear_rows"] = J
    B = torch.randn(3, 256, generator=g, dtype=torch.float64)
    out["rank3_of_7"] = torch.rand(7, 3, generator=g, dtype=torch.float64) @ B
    J = _jac(4, seed=3)
    J[2] = 0.0
    out["zero_row"] = J
    # strongly conflicting: zero-mean rows of different scales, a small shared part
    Z = torch.randn(8, 256, generator=g, dtype=torch.float64)
    out["conflicting_T8"] = ((Z - Z.mean(0)) * (0.1 + 3 * torch.rand(8, 1, generator=g,
                                                                     dtype=torch.float64))
                             + 0.1 * torch.randn(1, 256, generator=g, dtype=torch.float64))
    return out


CASES = _cases()
RANDOM = [n for n in CASES if n.startswith("random")]
UNIQUE = RANDOM + ["conflicting_T8"]     # affinely independent rows: w* is unique


def _gram(J: torch.Tensor, dtype) -> torch.Tensor:
    return (J @ J.T).to(dtype)


def _losses(T: int) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, T, dtype=torch.float64)


def _run(backend: str, fn, G, *args, **kw):
    with gradops.use_backend(backend):
        return fn(G, *args, **kw, return_status=True)


def _both(fn, G, *args, backend="cpp", **kw):
    return _run("torch", fn, G, *args, **kw), _run(backend, fn, G, *args, **kw)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = float(b.double().abs().max())
    diff = float((a.double() - b.double()).abs().max())
    return diff / scale if scale > 0 else diff


def _same_status_types(st_t: W.SolverStatus, st_c: W.SolverStatus) -> None:
    for a, b in zip(st_t, st_c):
        assert a.dtype == b.dtype and a.shape == b.shape == () and a.device == b.device


def _its_close(it_t: int, it_c: int) -> bool:
    """Frank-Wolfe iteration counts: the paths may part at a rounding-level tie (module
    docstring), after which each converges at the same linear rate."""
    return abs(it_t - it_c) <= 12 + max(it_t, it_c) // 4
