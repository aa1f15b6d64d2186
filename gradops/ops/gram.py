"""Gram matrices of task gradients: whole (``gram``) and per column segment (``segment_gram``).

Math (docs/methods.md#gram): for ``J`` = ``[T, P]`` (row ``t`` = flattened gradient of task ``t``),
``G = J J^T``; for a segment table ``offsets`` (``[L+1]`` int64,
docs/methods.md#segment-tables-and-layers) ``G[l] = J_l J_l^T`` —
the per-layer Grams of Recon (Shi et al., ICLR 2023, Def. 3) — all in **one pass** over ``J``.
The same pass can count, per pair, the coordinates with opposite signs and those where both are
non-zero (the sign-conflict ratio of Elich et al., "Examining Common Paradigms in MTL", §4).

This file holds the whole op: the Triton kernels and their launcher (CUDA tensors), the calls into
the C++ kernels (``csrc/gram_cpu.cpp``, ``csrc/gram_cuda.cu``), the pure-torch path
(``gradops.reference``), the ``torch.library`` custom ops with fake implementations, and the
public functions.

Determinism: every backend cuts the columns into pieces at fixed positions, reduces each piece in a
fixed order and sums the pieces in a fixed order (no float atomics), so the same inputs give
bit-identical results run to run on the same device.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import _backend
from .._backend import _C, register_op, select_backend
from .._validate import acc_dtype, check_matrix, check_offsets
from ..reference import segment_gram_reference, sign_counts_reference
from ..segments import segment_bounds
from ._eager import plain_eager_cpu

__all__ = ["gram", "segment_gram", "GramWithSignCounts"]

TRITON_MAX_T = 64  # the Triton kernel keeps a [next_pow2(T), next_pow2(T)] accumulator in registers
CUDA_MAX_T = int(getattr(_C, "cuda_max_T", 64)) if _C is not None else 64
MAX_T = {"triton": TRITON_MAX_T, "cuda": CUDA_MAX_T}
COUNT_EXACT_MAX = 1 << 24  # fp32 counts per piece are exact below this


class GramWithSignCounts(NamedTuple):
    """A Gram and, from the same pass, per-pair sign counts (int64, same shape as ``gram``).

    ``opposite[i, j]``: coordinates where ``J_i`` and ``J_j`` are both non-zero with opposite signs;
    ``both_nonzero[i, j]``: coordinates where both are non-zero. Their ratio is the sign-conflict
    ratio (:func:`gradops.metrics.sign_conflict_ratio`).
    """

    gram: torch.Tensor
    opposite: torch.Tensor
    both_nonzero: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if _backend.triton_importable()[0]:
    import triton
    import triton.language as tl

    @triton.jit
    def _segment_gram_pieces_kernel(
        J_ptr, offsets_ptr, ws_ptr, cnt_ws_ptr,
        T, P, L, row_stride, CH,
        BT: tl.constexpr, BLOCK_P: tl.constexpr, WITH_COUNTS: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Program ``c`` reduces columns ``[c*CH, (c+1)*CH)``: for every segment ``l`` that meets
        the chunk it writes the piece's partial Gram (and counts) to workspace slot ``c + l``.

        Along the columns, non-empty (chunk, segment) pieces form a staircase on which every step
        increases ``c`` or ``l``, so ``c + l`` is unique per piece, and the slots of one segment
        are consecutive (see ``_segment_reduce_kernel``). ``offsets`` are read on the device only.
        """
        c = tl.program_id(0).to(tl.int64)
        c0 = c * CH
        c1 = tl.minimum(c0 + CH, P)
        # first segment whose end lies beyond c0
        lo = 0
        hi = L - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(offsets_ptr + mid + 1) > c0:
                hi = mid
            else:
                lo = mid + 1
        rows = tl.arange(0, BT)
        cols = tl.arange(0, BLOCK_P)
        row_ok = rows < T
        row_base = J_ptr + rows.to(tl.int64)[:, None] * row_stride
        out_idx = rows[:, None] * T + rows[None, :]
        out_ok = row_ok[:, None] & row_ok[None, :]
        seg = lo
        seg_start = tl.load(offsets_ptr + seg)
        while seg_start < c1:
            seg_end = tl.load(offsets_ptr + seg + 1)
            a = tl.maximum(seg_start, c0)
            b = tl.minimum(seg_end, c1)
            if b > a:
                acc = tl.zeros([BT, BT], dtype=tl.float32)
                opp = tl.zeros([BT, BT], dtype=tl.float32)
                both = tl.zeros([BT, BT], dtype=tl.float32)
                for k in range(a, b, BLOCK_P):
                    kk = k + cols
                    x = tl.load(row_base + kk[None, :], mask=row_ok[:, None] & (kk < b)[None, :],
                                other=0.0)
                    if UPCAST:
                        x = x.to(tl.float32)
                    acc += tl.dot(x, tl.trans(x), input_precision=PRECISION)
                    if WITH_COUNTS:
                        ind_t = tl.float32 if UPCAST else tl.float16
                        pos = (x > 0).to(ind_t)
                        neg = (x < 0).to(ind_t)
                        nz = pos + neg
                        opp += tl.dot(pos, tl.trans(neg)) + tl.dot(neg, tl.trans(pos))
                        both += tl.dot(nz, tl.trans(nz))
                slot = (c + seg) * T * T
                tl.store(ws_ptr + slot + out_idx, acc, mask=out_ok)
                if WITH_COUNTS:
                    tl.store(cnt_ws_ptr + 2 * slot + out_idx, opp.to(tl.int32), mask=out_ok)
                    tl.store(cnt_ws_ptr + 2 * slot + T * T + out_idx, both.to(tl.int32),
                             mask=out_ok)
            seg += 1
            seg_start = tl.load(offsets_ptr + seg)  # offsets[L] == P >= c1 ends the loop

    @triton.jit
    def _segment_reduce_kernel(
        ws_ptr, cnt_ws_ptr, offsets_ptr, G_ptr, opp_ptr, both_ptr, T, CH,
        BT: tl.constexpr, WITH_COUNTS: tl.constexpr,
    ):
        """Program ``l`` sums the slots of segment ``l`` in increasing order (fixed order)."""
        seg = tl.program_id(0).to(tl.int64)
        a = tl.load(offsets_ptr + seg)
        b = tl.load(offsets_ptr + seg + 1)
        rows = tl.arange(0, BT)
        idx = rows[:, None] * T + rows[None, :]
        ok = (rows < T)[:, None] & (rows < T)[None, :]
        acc = tl.zeros([BT, BT], dtype=tl.float32)
        opp = tl.zeros([BT, BT], dtype=tl.int64)
        both = tl.zeros([BT, BT], dtype=tl.int64)
        if b > a:
            for s in range(a // CH + seg, (b - 1) // CH + seg + 1):
                acc += tl.load(ws_ptr + s * T * T + idx, mask=ok, other=0.0)
                if WITH_COUNTS:
                    opp += tl.load(cnt_ws_ptr + 2 * s * T * T + idx, mask=ok, other=0).to(tl.int64)
                    both += tl.load(cnt_ws_ptr + 2 * s * T * T + T * T + idx, mask=ok,
                                    other=0).to(tl.int64)
        tl.store(G_ptr + seg * T * T + idx, acc, mask=ok)
        if WITH_COUNTS:
            tl.store(opp_ptr + seg * T * T + idx, opp, mask=ok)
            tl.store(both_ptr + seg * T * T + idx, both, mask=ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _triton_chunk_size(P: int, block_p: int, device: torch.device, chunk: int | None = None) -> int:
    """Columns per Triton program: about 4 programs per SM (a few under the interpreter), a
    multiple of ``block_p``, and below 2^24 so that fp32 sign counts per piece stay exact."""
    if chunk is None:
        programs = 4 * _num_sms(device.index or 0) if device.type == "cuda" else 4
        chunk = -(-P // programs)
    chunk = max(block_p, min(int(chunk), COUNT_EXACT_MAX - block_p))
    return -(-chunk // block_p) * block_p


def _segment_gram_triton(J: torch.Tensor, offsets: torch.Tensor, with_counts: bool,
                         chunk: int | None = None):
    """Launch the two Triton kernels. ``chunk`` (columns per program) is for tests."""
    T, P = J.shape
    L = offsets.numel() - 1
    offsets = offsets.to(J.device, non_blocking=True)
    if P > 1 and J.stride(1) != 1:
        J = J.contiguous()
    row_stride = J.stride(0) if T > 1 else P
    G = torch.empty((L, T, T), dtype=torch.float32, device=J.device)
    opp = both = None
    if with_counts:
        opp = torch.empty((L, T, T), dtype=torch.int64, device=J.device)
        both = torch.empty_like(opp)
    if P == 0:
        G.zero_()
        if with_counts:
            opp.zero_()
            both.zero_()
        return G, opp, both
    BT = max(16, _next_pow2(T))
    BLOCK_P = {16: 256, 32: 128, 64: 64}[BT]
    interpret = _backend.triton_interpret()
    upcast = interpret or J.dtype == torch.float32
    # fp32 inputs: 3xTF32 on tensor cores (about fp32 accuracy); bf16/fp16: exact products,
    # fp32 accumulation. The interpreter computes in fp32/fp64 with numpy.
    precision = "ieee" if interpret else "tf32x3"
    CH = _triton_chunk_size(P, BLOCK_P, J.device, chunk)
    NC = -(-P // CH)
    ws = torch.empty((NC + L, T, T), dtype=torch.float32, device=J.device)
    cnt_ws = (torch.empty((NC + L, 2, T, T), dtype=torch.int32, device=J.device)
              if with_counts else ws)
    _segment_gram_pieces_kernel[(NC,)](
        J, offsets, ws, cnt_ws, T, P, L, row_stride, CH,
        BT=BT, BLOCK_P=BLOCK_P, WITH_COUNTS=with_counts, UPCAST=upcast, PRECISION=precision,
        num_warps=4)
    _segment_reduce_kernel[(L,)](
        ws, cnt_ws, offsets, G, opp if with_counts else G, both if with_counts else G, T, CH,
        BT=BT, WITH_COUNTS=with_counts, num_warps=4)
    return G, opp, both


# ---------------------------------------------------------------------------------------------
# C++ kernels and the torch reference, behind one signature
# ---------------------------------------------------------------------------------------------
def _segment_gram_cpp(J, offsets, with_counts):
    G, opp, both = _C.segment_gram_cpu(J, offsets.cpu(), with_counts)
    return G, (opp if with_counts else None), (both if with_counts else None)


def _segment_gram_cuda(J, offsets, with_counts):
    G, opp, both = _C.segment_gram_cuda(J, offsets.to(J.device, non_blocking=True), with_counts)
    return G, (opp if with_counts else None), (both if with_counts else None)


def _segment_gram_torch(J, offsets, with_counts):
    G = segment_gram_reference(J, offsets).to(acc_dtype(J.dtype))  # float64 stays float64
    if not with_counts:
        return G, None, None
    opp, both = sign_counts_reference(J, offsets)
    return G, opp, both


_IMPLS = {"triton": _segment_gram_triton, "cuda": _segment_gram_cuda,
          "cpp": _segment_gram_cpp, "torch": _segment_gram_torch}
# the kernels accumulate in float32: float64 inputs take the torch path (float64 accumulation)
_KERNEL_DTYPES = {b: _backend.KERNEL_DTYPES for b in ("triton", "cuda", "cpp")}
register_op("gram", ("triton", "cuda", "cpp", "torch"), MAX_T, _KERNEL_DTYPES)
register_op("segment_gram", ("triton", "cuda", "cpp", "torch"), MAX_T, _KERNEL_DTYPES)


def _run(op: str, J: torch.Tensor, offsets: torch.Tensor, with_counts: bool):
    backend = select_backend(op, J.device, J.shape[0], J.dtype)
    return _IMPLS[backend](J, offsets, with_counts)


def _whole(J: torch.Tensor) -> torch.Tensor:
    """The one-segment table ``[0, P]`` (on the CPU: no device copy for the C++ path)."""
    return torch.tensor([0, J.shape[1]], dtype=torch.int64)


def _gram_impl(J: torch.Tensor, with_counts: bool):
    """The whole-``J`` Gram ``[T, T]`` (with the sign counts: the tuple ``(G, opp, both)``)."""
    G, opp, both = _run("gram", J, _whole(J), with_counts)
    return (G[0], opp[0], both[0]) if with_counts else G[0]


def _check(op: str, J: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
    check_matrix(J, op)
    if offsets is not None:
        check_offsets(offsets, J.shape[1], op, J.device)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("gradops::gram", mutates_args=())
def _gram_op(J: torch.Tensor) -> torch.Tensor:
    _check("gram", J)
    return _gram_impl(J, False)


@_gram_op.register_fake
def _(J):
    _check("gram", J)
    return J.new_empty((J.shape[0], J.shape[0]), dtype=acc_dtype(J.dtype))


@torch.library.custom_op("gradops::segment_gram", mutates_args=())
def _segment_gram_op(J: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    _check("segment_gram", J, offsets)
    return _run("segment_gram", J, offsets, False)[0]


@_segment_gram_op.register_fake
def _(J, offsets):
    _check("segment_gram", J, offsets)
    return J.new_empty((offsets.shape[0] - 1, J.shape[0], J.shape[0]), dtype=acc_dtype(J.dtype))


@torch.library.custom_op("gradops::gram_sign_counts", mutates_args=())
def _gram_sign_counts_op(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("gram", J)
    return _gram_impl(J, True)


@_gram_sign_counts_op.register_fake
def _(J):
    _check("gram", J)
    T = J.shape[0]
    return (J.new_empty((T, T), dtype=acc_dtype(J.dtype)), J.new_empty((T, T), dtype=torch.int64),
            J.new_empty((T, T), dtype=torch.int64))


@torch.library.custom_op("gradops::segment_gram_sign_counts", mutates_args=())
def _segment_gram_sign_counts_op(J: torch.Tensor, offsets: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("segment_gram", J, offsets)
    return _run("segment_gram", J, offsets, True)


@_segment_gram_sign_counts_op.register_fake
def _(J, offsets):
    _check("segment_gram", J, offsets)
    shape = (offsets.shape[0] - 1, J.shape[0], J.shape[0])
    return (J.new_empty(shape, dtype=acc_dtype(J.dtype)), J.new_empty(shape, dtype=torch.int64),
            J.new_empty(shape, dtype=torch.int64))


# Autograd: dL/dJ = (Gbar + Gbar^T) J, per segment for segment_gram (gradients of Gram-based
# regularisers; the gradient methods themselves never differentiate through the Gram).
def _gram_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gram_backward(ctx, grad):
    (J,) = ctx.saved_tensors
    return ((grad + grad.T) @ J.to(grad.dtype)).to(J.dtype)


def _segment_gram_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


@torch.library.custom_op("gradops::segment_gram_backward", mutates_args=())
def _segment_gram_backward_op(grad: torch.Tensor, J: torch.Tensor, offsets: torch.Tensor
                              ) -> torch.Tensor:
    """``dJ[:, seg l] = (grad[l] + grad[l]^T) J[:, seg l]`` (opaque: reads the segment table)."""
    sym = grad + grad.transpose(1, 2)
    Jf = J.to(grad.dtype)
    dJ = torch.zeros_like(Jf)
    for l, (a, b) in enumerate(segment_bounds(offsets)):
        if b > a:
            dJ[:, a:b] = sym[l] @ Jf[:, a:b]
    return dJ.to(J.dtype)


@_segment_gram_backward_op.register_fake
def _(grad, J, offsets):
    return J.new_empty(J.shape)


def _segment_gram_backward(ctx, grad):
    J, offsets = ctx.saved_tensors
    return torch.ops.gradops.segment_gram_backward(grad, J, offsets), None


_gram_op.register_autograd(_gram_backward, setup_context=_gram_setup)
_segment_gram_op.register_autograd(_segment_gram_backward, setup_context=_segment_gram_setup)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def gram(J: torch.Tensor, *, return_sign_counts: bool = False
         ) -> torch.Tensor | GramWithSignCounts:
    """Gram matrix ``G = J J^T`` of task gradients, fp32 (fp64 for fp64 ``J``), in one pass.

    Args:
        J: ``[T, P]`` float32 / bfloat16 / float16 (fp32 accumulation) or float64 (fp64
            accumulation, on the torch path). Rows may be strided views (``J[:, a:b]``); ``P``
            may exceed 2^31.
        return_sign_counts: also return, from the same pass, per pair the number of coordinates
            with opposite signs and with both non-zero (:class:`GramWithSignCounts`).

    Returns:
        ``[T, T]`` float32 (float64 for float64 ``J``; symmetric, PSD up to rounding), or a
        :class:`GramWithSignCounts`.

    Raises:
        TypeError: for a ``J`` that is not a dense tensor of a supported floating dtype.
        ValueError: for a ``J`` that is not 2-D ``[T, P]`` with ``T >= 1``.

    Non-finite entries of ``J`` propagate into the rows/columns of ``G`` they touch. Backend: see
    :func:`gradops.info` (Triton on CUDA, C++ on CPU, torch reference otherwise).
    """
    _check("gram", J)
    if plain_eager_cpu(J):  # the ops' implementation, directly (see ops/_eager.py)
        res = _gram_impl(J, return_sign_counts)
        return GramWithSignCounts(*res) if return_sign_counts else res
    if return_sign_counts:
        return GramWithSignCounts(*torch.ops.gradops.gram_sign_counts(J))
    return torch.ops.gradops.gram(J)


def segment_gram(J: torch.Tensor, offsets: torch.Tensor, *, return_sign_counts: bool = False
                 ) -> torch.Tensor | GramWithSignCounts:
    """Per-segment Grams ``G[l] = J[:, o_l:o_{l+1}] J[:, o_l:o_{l+1}]^T``, all in one pass over
    ``J``.

    These are the per-layer Grams of Recon (Shi et al., ICLR 2023): with one segment per layer,
    ``gradops.metrics.conflict_counts(segment_gram(J, offsets), S)`` is Recon's S-conflict score.

    Args:
        J: ``[T, P]`` float32 / bfloat16 / float16 (fp32 accumulation) or float64 (fp64
            accumulation), rows may be strided.
        offsets: int64 ``[L+1]`` segment table (docs/methods.md#segment-tables-and-layers):
            ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == P``. Empty segments are
            allowed and give zero Grams. Keep it on the CPU (values are validated there;
            gradops copies it to the device for GPU kernels).
        return_sign_counts: also return per-segment sign counts (:class:`GramWithSignCounts`).

    Returns:
        ``[L, T, T]`` float32 (float64 for float64 ``J``) with ``result.sum(0) == gram(J)`` up to
        rounding, or a :class:`GramWithSignCounts` of ``[L, T, T]`` tensors.

    Raises:
        TypeError: for a ``J`` that is not a dense tensor of a supported floating dtype, or
            ``offsets`` that are not int64.
        ValueError: for a ``J`` that is not 2-D ``[T, P]`` with ``T >= 1``, or a bad segment
            table (not 1-D, not from 0 to ``P``, decreasing, or on another device).
    """
    _check("segment_gram", J, offsets)
    if plain_eager_cpu(J, offsets):  # the ops' implementation, directly (see ops/_eager.py)
        G, opp, both = _run("segment_gram", J, offsets, return_sign_counts)
        return GramWithSignCounts(G, opp, both) if return_sign_counts else G
    if return_sign_counts:
        return GramWithSignCounts(*torch.ops.gradops.segment_gram_sign_counts(J, offsets))
    return torch.ops.gradops.segment_gram(J, offsets)
