"""Property checks shared by the op and weighting tests (in the spirit of TorchJD's
``tests/unit/aggregation/_asserts.py``): structure, permutation equivariance, behaviour under
``J -> sJ``, propagation of non-finite values, and Gram form = vector form.

An op is described by an :class:`OpCase`: a function ``(J, pi) -> outputs`` and, for each output,
an :class:`Out` that says what it looks like and how it transforms. ``pi`` is ``None`` for the
problem as given, or the task permutation the caller applied to ``J`` (``J = J0[pi]``: new task
``k`` is old task ``pi[k]``); an op whose arguments are indexed by task (weights, leaks, visiting
orders, EMA targets) permutes them the same way, so that it solves the same problem.

Tolerances are elementwise, ``|y - e| <= rtol |e| + atol m^degree`` with ``m = max_i ||g_i||``
(the scale of the problem) and ``degree`` the output's degree in ``J``: float32 rounding of a
Gram entry is bounded by ``|g_i| . |g_j| <= m^2``, of an update by ``m``, of a weight by 1.
Integer and bool outputs compare exactly.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import torch

import gradops

from backend_lists import cpu_backends, gpu_backends

Index = tuple  # an index into an output: ints, slices, Ellipsis


@dataclass(frozen=True)
class Out:
    """One output of an op.

    Attributes:
        name: for messages.
        shape: ``(T, P) -> shape``.
        dtype: expected dtype; ``None``: ``J``'s dtype.
        task_dims: the dimensions indexed by task (permuted with the tasks).
        degree: under ``J -> sJ`` the output becomes ``sign(s)^odd |s|^degree`` times itself.
        odd: see ``degree``.
        nonfinite_at: ``(i, k, T, P) -> index`` of the entries where a NaN/Inf put at ``J[i, k]``
            must show (non-finite; for a bool mask: selected); ``None``: not applicable (integer
            counts, which count a NaN as neither sign, and outputs documented to ignore it).
        needs_full_rank: the output is determined only when ``J`` has full row rank (the
            weights of a min-norm point: any convex combination reaching it will do); the
            permutation and scaling checks leave it out otherwise.
    """

    name: str
    shape: Callable[[int, int], tuple[int, ...]]
    dtype: torch.dtype | None = torch.float32
    task_dims: tuple[int, ...] = ()
    degree: int = 0
    odd: bool = False
    nonfinite_at: Callable[[int, int, int, int], Index] | None = None
    needs_full_rank: bool = False

    @property
    def exact(self) -> bool:
        return self.dtype is not None and not self.dtype.is_floating_point


@dataclass(frozen=True)
class OpCase:
    """An op (or a weighting with its Gram and combine passes) as the checks see it.

    Attributes:
        name: the test id.
        fn: ``(J, pi) -> tuple of outputs`` (see the module docstring for ``pi``).
        outs: one :class:`Out` per output.
        reference: ``J`` (float64, CPU) -> the expected outputs in float64 computed without the
            Gram (the vector form), ``None`` where an output has no reference.
        rtol, atol: tolerances of the property checks (module docstring).
        ref_rtol, ref_atol: tolerances against ``reference`` (solvers stop at their ``tol``).
        positive_scales_only: the op has no rule for ``s < 0`` (GradDrop's signs).
        full_rank_only: only tested where ``J`` has full row rank (``P >= T``).
        reference_full_rank_only: ``reference`` is the op's definition only where ``J`` has
            full row rank (the op documents a different choice otherwise).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, ...]]
    outs: tuple[Out, ...]
    reference: Callable[[torch.Tensor], tuple[torch.Tensor | None, ...]] | None = None
    rtol: float = 1e-5
    atol: float = 1e-5
    ref_rtol: float = 1e-4
    ref_atol: float = 1e-5
    positive_scales_only: bool = False
    full_rank_only: bool = False
    reference_full_rank_only: bool = False

    def __str__(self) -> str:
        return self.name


BACKEND_OF_ROLE = {"cpu": {"torch": "torch", "native": "cpp", "triton": "triton"},
                   "cuda": {"torch": "torch", "native": "cuda", "triton": "triton"}}
"""The backend that plays each role on each device type: the torch reference, the compiled
kernels of ``gradops._C`` (C++ on CPU, CUDA C++ on GPU; an op without one makes its automatic
choice) and Triton (interpreted on CPU)."""


@contextlib.contextmanager
def on_backend(device: torch.device, role: str) -> Iterator[str]:
    """Force the backend playing ``role`` (:data:`BACKEND_OF_ROLE`) for ``device``'s tensors;
    skip (with the reason) where this build or machine does not have it, e.g. ``cpp`` under
    ``GRADOPS_NO_EXT=1`` or Triton on CPU without ``TRITON_INTERPRET=1``."""
    name = BACKEND_OF_ROLE[device.type][role]
    available = cpu_backends() if device.type == "cpu" else gpu_backends()
    if name not in available:
        pytest.skip(f"backend {name!r} is not available for {device.type} tensors here")
    with gradops.use_backend(name):
        yield name


def run(op: OpCase, J: torch.Tensor, pi: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The op's outputs as a tuple, checked to be one per :class:`Out`."""
    ys = op.fn(J, pi)
    ys = tuple(ys) if isinstance(ys, (tuple, list)) else (ys,)
    assert len(ys) == len(op.outs), f"{op}: {len(ys)} outputs, {len(op.outs)} described"
    return ys


def problem_scale(J: torch.Tensor) -> float:
    """``max_i ||g_i||`` in float64 (the unit of the tolerances)."""
    return max(float(J.detach().double().norm(dim=1).max()), 1e-30) if J.numel() else 1.0


def assert_close(y: torch.Tensor, expected: torch.Tensor, spec: Out, rtol: float, atol: float,
                 m: float, what: str) -> None:
    """``y`` equals ``expected`` exactly (integer/bool outputs) or within
    ``rtol |e| + atol m^degree`` elementwise; NaN where ``expected`` is NaN."""
    assert y.shape == expected.shape, f"{what}: shape {tuple(y.shape)} != {tuple(expected.shape)}"
    y, e = y.detach().cpu(), expected.detach().cpu()
    if spec.exact:
        assert torch.equal(y, e.to(y.dtype)), f"{what}: {y.tolist()} != {e.tolist()}"
        return
    y, e = y.double(), e.double()
    bound = rtol * e.abs() + atol * m ** spec.degree
    err = (y - e).abs()
    ok = (err <= bound) | (torch.isnan(y) & torch.isnan(e))
    if not bool(ok.all()):
        worst = int(torch.where(ok, torch.zeros_like(err), err / bound).flatten().argmax())
        raise AssertionError(f"{what}: max error / bound = {float((err / bound).max()):.3g} at "
                             f"flat index {worst}: got {y.flatten()[worst].item():.9g}, "
                             f"expected {e.flatten()[worst].item():.9g}")


def full_row_rank(J: torch.Tensor) -> bool:
    return int(torch.linalg.matrix_rank(J.detach().double().cpu())) == J.shape[0]


def _determined(spec: Out, J: torch.Tensor) -> bool:
    return not spec.needs_full_rank or full_row_rank(J)


def _permute(y: torch.Tensor, dims: tuple[int, ...], pi: torch.Tensor) -> torch.Tensor:
    for d in dims:
        y = y.index_select(d, pi.to(y.device))
    return y


def task_permutation(T: int, seed: int = 0) -> torch.Tensor:
    """A fixed permutation of ``T`` tasks that moves every task when ``T >= 2`` (a derangement:
    an identity would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        pi = torch.randperm(T, generator=g)
        if T < 2 or bool((pi != torch.arange(T)).all()):
            return pi


def assert_structure(op: OpCase, J: torch.Tensor) -> None:
    """Every output has the documented shape and dtype, lives on ``J``'s device, and is finite
    (``J`` is finite)."""
    T, P = J.shape
    for spec, y in zip(op.outs, run(op, J)):
        what = f"{op}.{spec.name}"
        assert isinstance(y, torch.Tensor), f"{what}: not a tensor but {type(y).__name__}"
        assert tuple(y.shape) == spec.shape(T, P), f"{what}: shape {tuple(y.shape)}, expected " \
                                                   f"{spec.shape(T, P)}"
        expected = J.dtype if spec.dtype is None else spec.dtype
        assert y.dtype == expected, f"{what}: dtype {y.dtype}, expected {expected}"
        assert y.device == J.device, f"{what}: on {y.device}, J on {J.device}"
        if y.is_floating_point():
            assert bool(torch.isfinite(y).all()), f"{what}: non-finite output of a finite J"


def assert_permutation_equivariant(op: OpCase, J: torch.Tensor,
                                   pi: torch.Tensor | None = None) -> None:
    """Solving the problem with its tasks permuted by ``pi`` permutes every task-indexed output
    the same way (Grams on both axes, weights on theirs) and leaves the others unchanged (the
    combined vector)."""
    pi = task_permutation(J.shape[0]) if pi is None else pi
    m = problem_scale(J)
    base, permuted = run(op, J), run(op, J[pi.to(J.device)], pi)
    for spec, y, yp in zip(op.outs, base, permuted):
        if not _determined(spec, J):
            continue
        assert_close(yp, _permute(y, spec.task_dims, pi), spec, op.rtol, op.atol, m,
                     f"{op}.{spec.name} under the task permutation {pi.tolist()}")


def assert_scaling(op: OpCase, J: torch.Tensor, s: float) -> None:
    """``J -> sJ`` multiplies each output by ``sign(s)^odd |s|^degree`` (its :class:`Out`): the
    Gram by ``s^2``, an update by ``s``, invariant weights by 1, Nash-MTL's by ``1/|s|``."""
    if s == 0 or (op.positive_scales_only and s < 0):
        raise ValueError(f"assert_scaling: {op} has no scaling rule for s = {s}")
    m = problem_scale(J)
    base, scaled = run(op, J), run(op, J * s)
    for spec, y, ys in zip(op.outs, base, scaled):
        if not _determined(spec, J):
            continue
        factor = (math.copysign(1.0, s) if spec.odd else 1.0) * abs(s) ** spec.degree
        expected = y if spec.exact else y.double() * factor
        assert_close(ys, expected, spec, op.rtol, op.atol, abs(s) * m,
                     f"{op}.{spec.name} under J -> {s:g} J (factor {factor:.6g})")


def assert_nonfinite_propagates(op: OpCase, J: torch.Tensor, value: float = math.nan) -> None:
    """A NaN (or Inf) put at ``J[T-1, P//2]`` reaches every output that depends on that entry
    (:attr:`Out.nonfinite_at`); it is never replaced by a finite value. A bool mask must select
    the entry (non-finite magnitudes count as the largest)."""
    T, P = J.shape
    i, k = T - 1, P // 2
    Jb = J.clone()
    Jb[i, k] = value
    checked = 0
    for spec, y in zip(op.outs, run(op, Jb)):
        if spec.nonfinite_at is None:
            continue
        idx = spec.nonfinite_at(i, k, T, P)
        part = y[idx]
        what = f"{op}.{spec.name}[{idx}] with J[{i}, {k}] = {value}"
        if y.dtype == torch.bool:
            assert bool(part.all()), f"{what}: the non-finite entry was not selected"
        else:
            assert not bool(torch.isfinite(part).all()), f"{what}: finite ({part.tolist()})"
        checked += 1
    assert checked, f"{op}: no output says where a non-finite J must show"


def assert_gram_form_equals_vector_form(op: OpCase, J: torch.Tensor) -> None:
    """What the op computes through the Gram (weights from ``G``, then combined with ``J``)
    equals the vector-form computation on ``J`` in float64 (``op.reference``: the papers'
    algorithms on the task gradients, tests/method_references.py and gradops.reference)."""
    assert op.reference is not None, f"{op} has no vector-form reference"
    m = problem_scale(J)
    refs = op.reference(J.detach().double().cpu())
    compared = 0
    for spec, y, r in zip(op.outs, run(op, J), refs):
        if r is None:
            continue
        assert_close(y, torch.as_tensor(r), spec, op.ref_rtol, op.ref_atol, m,
                     f"{op}.{spec.name} against its vector form")
        compared += 1
    assert compared, f"{op}: the reference compares no output"


# -- properties of a weighting's update d = w^T J (tests/weighting/test_geometries.py) --------- #

def assert_finite(y: torch.Tensor, what: str = "") -> None:
    """Finite output (for a finite input)."""
    assert bool(torch.isfinite(y).all()), f"{what}: non-finite output {y}"


def assert_non_conflicting(J: torch.Tensor, d: torch.Tensor, rtol: float, what: str = "") -> None:
    """``g_i . d >= -rtol m^2`` for every task (``m = max_i ||g_i||``): the update does not
    conflict with any task gradient, within the tolerance."""
    Jd, d = J.double(), d.double()
    worst = float((Jd @ d).min())
    m = problem_scale(J)
    assert worst >= -rtol * m * m, f"{what}: min_i g_i . d = {worst:.3g} < -{rtol:g} m^2 ({m:.3g})"


def assert_updates_close(d: torch.Tensor, expected: torch.Tensor, J: torch.Tensor, rtol: float,
                         what: str = "") -> None:
    """``max |d - expected| <= rtol m``: two updates of the same problem agree at its scale."""
    err = float((d.double() - expected.double()).abs().max())
    m = problem_scale(J)
    assert err <= rtol * m, f"{what}: max |d - expected| = {err:.3g} > {rtol:g} m ({m:.3g})"
