"""Weighted combination of task gradients: ``g = w^T J``, or one weight vector per segment.

This is the second pass of every Gram-weighted method (docs/methods.md#combine): a ``T x T`` solver
turns the
Gram into weights ``w`` (``[T]``, or ``[L, T]`` for per-layer methods such as per-layer PCGrad or
GradVac), and ``combine`` reads ``J`` once to write ``g[k] = sum_t w[l(k), t] J[t, k]``, where
``l(k)`` is the segment of column ``k``. With ``out=`` the result lands directly in a caller's
buffer, e.g. a flat view over the parameters' ``.grad`` storage, with no extra copy.

The Triton kernel, the call into the C++ kernel (``csrc/combine_cpu.cpp``), the torch reference
and the custom-op registration live side by side here. Terms are summed over ``t`` in a fixed
order, so results are deterministic; NaN/Inf in ``J`` reach the output even where a weight is 0.
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from .._backend import _C, register_op, select_backend
from .._validate import FLOAT_DTYPES, FLOAT_NAMES, acc_dtype, check_matrix, check_offsets
from ..reference import combine_reference
from ._eager import plain_eager_cpu

__all__ = ["combine"]

# the kernels accumulate in float32: float64 J or out takes the torch path (float64 math)
register_op("combine", ("triton", "cpp", "torch"),
            dtypes={"triton": _backend.KERNEL_DTYPES, "cpp": _backend.KERNEL_DTYPES})

if _backend.triton_importable()[0]:
    import triton
    import triton.language as tl

    @triton.jit
    def _combine_kernel(J_ptr, w_ptr, offsets_ptr, out_ptr, T, P, L, row_stride,
                        BLOCK: tl.constexpr, SEGMENTED: tl.constexpr, SEARCH_STEPS: tl.constexpr):
        """Program ``b`` writes ``out[b*BLOCK : (b+1)*BLOCK]``, looping over the ``T`` rows."""
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < P
        if SEGMENTED:
            # per column, the segment l with offsets[l] <= k < offsets[l+1] (binary search on the
            # first l whose end lies beyond k; empty segments are skipped naturally)
            lo = tl.zeros([BLOCK], dtype=tl.int32)
            hi = tl.zeros([BLOCK], dtype=tl.int32) + (L - 1)
            for _ in tl.static_range(SEARCH_STEPS):
                mid = (lo + hi) // 2
                right = tl.load(offsets_ptr + mid + 1) <= cols
                lo = tl.where(right, mid + 1, lo)
                hi = tl.where(right, hi, mid)
            w_row = lo.to(tl.int64) * T
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for t in range(T):
            x = tl.load(J_ptr + t * row_stride + cols, mask=ok, other=0.0).to(tl.float32)
            if SEGMENTED:
                w = tl.load(w_ptr + w_row + t, mask=ok, other=0.0)
            else:
                w = tl.load(w_ptr + t)
            acc += w * x
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _combine_triton(J, weights, offsets, out):
    T, P = J.shape
    L = weights.shape[0]
    if P == 0:
        return
    if P > 1 and J.stride(1) != 1:
        J = J.contiguous()
    row_stride = J.stride(0) if T > 1 else P
    segmented = offsets is not None and L > 1
    offs = offsets.to(J.device, non_blocking=True) if segmented else weights  # dummy when unused
    steps = max(1, math.ceil(math.log2(L))) + 1 if segmented else 1
    block = 256 if _backend.triton_interpret() else 1024
    dst = _backend.interpreter_output(out)
    _combine_kernel[(triton.cdiv(P, block),)](
        J, weights, offs, dst, T, P, L, row_stride,
        BLOCK=block, SEGMENTED=segmented, SEARCH_STEPS=steps, num_warps=4)
    if dst is not out:
        out.copy_(dst)


def _combine_cpp(J, weights, offsets, out):
    _C.combine_cpu(J, weights, offsets.cpu() if offsets is not None else None, out)


def _combine_torch(J, weights, offsets, out):
    out.copy_(combine_reference(J, weights, offsets))


_IMPLS = {"triton": _combine_triton, "cpp": _combine_cpp, "torch": _combine_torch}


def _check(J, weights, offsets, out=None) -> None:
    check_matrix(J, "combine")
    T = J.shape[0]
    if not isinstance(weights, torch.Tensor):
        raise TypeError("gradops.combine: weights must be a torch.Tensor, got "
                        f"{type(weights).__name__}")
    if weights.dim() not in (1, 2) or weights.shape[-1] != T:
        raise ValueError(f"gradops.combine: weights must be [T] or [L, T] with T = {T} (the rows "
                         f"of J), got shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        raise TypeError(f"gradops.combine: weights must be floating point, got {weights.dtype}")
    if weights.device != J.device:
        raise ValueError(f"gradops.combine: weights must be on J's device ({J.device}), "
                         f"got {weights.device}")
    if weights.dim() == 2:
        if offsets is None:
            raise ValueError("gradops.combine: weights of shape [L, T] need offsets (a segment "
                             "table [L+1]) to say which columns each row of weights applies to")
        check_offsets(offsets, J.shape[1], "combine", J.device)
        if offsets.shape[0] != weights.shape[0] + 1:
            raise ValueError(f"gradops.combine: weights has L = {weights.shape[0]} rows but "
                             "offsets "
                             f"describes {offsets.shape[0] - 1} segments")
    elif offsets is not None:
        raise ValueError("gradops.combine: offsets given but weights is [T]; pass weights [L, T] "
                         "for one combination per segment")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.dim() != 1 or out.shape[0] != J.shape[1]:
            raise ValueError(f"gradops.combine: out must be a 1-D tensor of P = {J.shape[1]} "
                             "elements, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else out}")
        if out.dtype not in FLOAT_DTYPES:
            raise TypeError(f"gradops.combine: out must be {FLOAT_NAMES}, got {out.dtype}")
        if out.device != J.device:
            raise ValueError(f"gradops.combine: out must be on J's device ({J.device}), got "
                             f"{out.device}")


def _run(J, weights, offsets, out):
    """Compute into ``out`` (contiguous): the kernels write it directly."""
    dtype = torch.float64 if torch.float64 in (J.dtype, out.dtype) else J.dtype
    backend = select_backend("combine", J.device, J.shape[0], dtype)
    if backend == "cpp" and weights.dtype == torch.float32 and weights.is_contiguous():
        w = weights  # [T] or [L, T] as it is: no tensor op (each costs tens of microseconds
        # with the caches cold after a pass over a large J)
    else:  # float32 weights (float64 for float64 J: its math is float64)
        w = weights.to(acc_dtype(J.dtype)).reshape(-1, J.shape[0]).contiguous()
    _IMPLS[backend](J, w, offsets if weights.dim() == 2 else None, out)


def _combine_new(J, weights, offsets):
    out = J.new_empty(J.shape[1])
    _run(J, weights, offsets, out)
    return out


def _combine_into(J, weights, offsets, out) -> None:
    if out.is_contiguous():
        _run(J, weights, offsets, out)
    else:  # a strided destination: compute, then one copy
        tmp = out.new_empty(out.shape)
        _run(J, weights, offsets, tmp)
        out.copy_(tmp)


@torch.library.custom_op("gradops::combine", mutates_args=())
def _combine_op(J: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor | None
                ) -> torch.Tensor:
    _check(J, weights, offsets)
    return _combine_new(J, weights, offsets)


@_combine_op.register_fake
def _(J, weights, offsets):
    _check(J, weights, offsets)
    return J.new_empty(J.shape[1])


@torch.library.custom_op("gradops::combine_out", mutates_args=("out",))
def _combine_out_op(J: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor | None,
                    out: torch.Tensor) -> None:
    _check(J, weights, offsets, out)
    _combine_into(J, weights, offsets, out)


@_combine_out_op.register_fake
def _(J, weights, offsets, out):
    _check(J, weights, offsets, out)


def combine(J: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor | None = None, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted combination ``g = w^T J`` (one pass over ``J``), per segment when ``w`` is 2-D.

    Args:
        J: ``[T, P]`` float32 / bfloat16 / float16 task gradients (fp32 math), or float64 (fp64
            math, on the torch path); rows may be strided.
        weights: ``[T]``, or ``[L, T]`` with ``offsets``: segment ``l`` (columns
            ``offsets[l]:offsets[l+1]``) is combined with ``weights[l]`` (per-layer methods).
        offsets: int64 ``[L+1]`` segment table (docs/methods.md#segment-tables-and-layers), only
            with 2-D ``weights``.
        out: optional 1-D ``[P]`` destination (float32/bfloat16/float16/float64, e.g. a flat
            view over parameters' ``.grad`` storage); written in place and returned. Nothing
            outside it is touched.

    Returns:
        ``[P]`` in ``J``'s dtype (or ``out``).

    Raises:
        TypeError: for a ``J``, ``weights`` or ``out`` that is not a floating-point tensor (of a
            supported dtype), or ``offsets`` that are not int64.
        ValueError: for shapes that do not match (``weights`` ``[T]`` / ``[L, T]`` with or
            without ``offsets``, ``out`` ``[P]``), a bad segment table, or a tensor on another
            device.
    """
    _check(J, weights, offsets, out)
    if plain_eager_cpu(J, weights, offsets, out):  # the ops' implementations, directly
        if out is None:
            return _combine_new(J, weights, offsets)
        _combine_into(J, weights, offsets, out)
        return out
    if out is None:
        return torch.ops.gradops.combine(J, weights, offsets)
    torch.ops.gradops.combine_out(J, weights, offsets, out)
    return out
