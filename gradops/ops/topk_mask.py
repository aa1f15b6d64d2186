"""Per-neuron top-K magnitude masks (PSN, the sparse-training paper's Sec. 3.4;
docs/methods.md#sparse-training).

A weight ``W`` is viewed as ``[out, F]``: dim 0 = output neurons, the other dims flattened into the
fan-in (a conv weight ``[out, in, kh, kw]`` has ``F = in * kh * kw``; a 1-D ``W`` is ``[out, 1]``).
In each row the ``K = min(k, F)`` entries of largest ``|W|`` are kept; equal magnitudes are broken
by the *lower* column index, and NaN ranks largest, above ``+inf`` (NaNs tie with each other), as
in ``torch.sort``. Magnitudes are compared in fp64 for fp64 weights and in fp32 otherwise (bf16 /
fp16 convert exactly), exactly as the ground truth ``gradops.reference.topk_mask_reference`` (a
stable descending sort) does, so every backend returns the reference's mask bit for bit.

Every backend ranks by an integer key per entry: the bit pattern of ``|x|`` (non-negative floats
order like their bit patterns; int32 for fp32 / bf16 / fp16, int64 for fp64), NaN mapped to the
pattern just above ``+inf`` (``0x7F800001`` / ``0x7FF0000000000001``).

Two outputs: ``topk_mask`` (bool, ``W``'s shape) and the packed ``topk_indices`` (int32
``[out, K]``, each row's kept column indices in increasing order), for compact optimizers that
gather/scatter only the selected entries.

No backend sorts. The **Triton kernel** gives each program one row, or several narrow
rows as a 2-D tile (at most 4,096 elements): it loads each row once, turns ``|x|`` into its key,
finds the K-th largest key ``v`` by a 31-step (63 for fp64) bitwise binary search (each step
counts the entries ``>= candidate``), keeps the entries ``> v`` and, of those ``== v``, the
lowest-index ones up to the remaining count (``tl.cumsum`` over the equality mask); the packed
indices go to position ``(exclusive cumsum of the kept flags)``. Rows wider than
:data:`MAX_TRITON_F` (16,384) do not fit one block: such weights take the torch path (the
fallback for very wide rows). The **torch path** (any device, vectorised over rows, no full
sort) takes the threshold from unsorted ``torch.topk`` values (a selection: ``nth_element`` on
CPU, a radix select on CUDA) and breaks ties with a cumsum. The **C++ kernel** (CPU tensors,
``csrc/topk_cpu.cpp``, the default there; OpenMP over rows) uses the same keys: per row it
histograms their top 12 bits, finds the bin of the K-th largest key, selects the threshold among
that bin's keys with ``std::nth_element``, and writes the mask / the packed indices in one more
pass (keep ``> v``, then the lowest-index ``== v`` up to the remaining count).
"""
from __future__ import annotations

import functools
import operator

import torch

from .. import _backend
from .._backend import register_op, select_backend

__all__ = ["topk_indices", "topk_mask"]

register_op("topk_mask", ("triton", "cpp", "torch"))
register_op("topk_indices", ("triton", "cpp", "torch"))

#: Widest row (fan-in ``F``) the Triton kernel handles in one block; wider weights use the
#: torch path.
MAX_TRITON_F = 16_384

_FLOAT_W = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

if _backend.triton_importable()[0]:
    import triton
    import triton.language as tl

    @triton.jit
    def _topk_rows_kernel(W_ptr, mask_ptr, idx_ptr, R, F, K, row_stride,
                          ROWS: tl.constexpr, BLOCK: tl.constexpr, WITH_MASK: tl.constexpr,
                          WITH_INDICES: tl.constexpr, IS64: tl.constexpr):
        """Program ``p`` selects the top ``K`` magnitudes of rows ``[p*ROWS, (p+1)*ROWS)``
        (``F <= BLOCK``; each row is loaded once and stays in registers)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        ok = (rows < R)[:, None] & (cols < F)[None, :]
        if IS64:       # fp64: int64 keys, NaN -> just above +inf
            x = tl.load(W_ptr + rows[:, None] * row_stride + cols[None, :], mask=ok, other=0.0)
            bits = tl.abs(x).to(tl.int64, bitcast=True)
            bits = tl.where(x != x, 0x7FF0000000000001, bits)
            bits = tl.where(ok, bits, -1)              # padding: below every magnitude
            # v = the K-th largest key of each row: the largest v with #{bits >= v} >= K,
            # decided bit by bit from bit 62 (bit 63, the sign, is 0 for every magnitude)
            v = tl.zeros([ROWS], dtype=tl.int64)
            one = tl.full([ROWS], 1, dtype=tl.int64)
            for i in tl.static_range(63):
                cand = v | (one << (62 - i))
                n = tl.sum((bits >= cand[:, None]).to(tl.int32), axis=1)
                v = tl.where(n >= K, cand, v)
        else:          # fp32 / bf16 / fp16: int32 keys of the fp32 magnitude
            x = tl.load(W_ptr + rows[:, None] * row_stride + cols[None, :], mask=ok,
                        other=0.0).to(tl.float32)
            bits = tl.abs(x).to(tl.int32, bitcast=True)
            bits = tl.where(x != x, 0x7F800001, bits)  # NaN -> just above +inf
            bits = tl.where(ok, bits, -1)
            v = tl.zeros([ROWS], dtype=tl.int32)
            for i in tl.static_range(31):
                cand = v | (1 << (30 - i))
                n = tl.sum((bits >= cand[:, None]).to(tl.int32), axis=1)
                v = tl.where(n >= K, cand, v)
        above = bits > v[:, None]
        room = K - tl.sum(above.to(tl.int32), axis=1)  # ties still to keep, lowest index first
        tie = bits == v[:, None]
        tie_rank = tl.cumsum(tie.to(tl.int32), axis=1)   # 1-based rank among the row's ties
        keep = above | (tie & (tie_rank <= room[:, None]))
        if WITH_MASK:
            tl.store(mask_ptr + rows[:, None] * F + cols[None, :], keep.to(tl.uint8), mask=ok)
        if WITH_INDICES:
            k32 = keep.to(tl.int32)
            pos = tl.cumsum(k32, axis=1) - k32          # exclusive: slot of each kept entry
            cols2 = tl.zeros([ROWS, BLOCK], dtype=tl.int32) + cols[None, :]
            tl.store(idx_ptr + rows[:, None] * K + pos, cols2, mask=keep)


def _as_rows(W: torch.Tensor) -> torch.Tensor:
    """``W`` as ``[out, F]`` (a view when the layout allows)."""
    return W.reshape(W.shape[0], _fan_in(W))   # not -1: W may have no rows


def _fan_in(W) -> int:
    """``F``, the product of ``W.shape[1:]`` (symbolic-shape friendly, 1 for a 1-D ``W``)."""
    return functools.reduce(operator.mul, W.shape[1:], 1)


# --- torch path ------------------------------------------------------------------------------
_NAN_KEY32 = 0x7F800001
_NAN_KEY64 = 0x7FF0000000000001


def _magnitudes(rows: torch.Tensor) -> torch.Tensor:
    """The integer keys of ``|rows|`` (module docstring): int64 for fp64, int32 otherwise; NaN
    -> the key just above ``+inf`` (a fresh tensor)."""
    if rows.dtype == torch.float64:
        bits, nan_key = rows.view(torch.int64) & 0x7FFFFFFFFFFFFFFF, _NAN_KEY64
    else:
        f32 = rows if rows.dtype == torch.float32 else rows.to(torch.float32)
        bits, nan_key = f32.view(torch.int32) & 0x7FFFFFFF, _NAN_KEY32
    return bits.clamp_(max=nan_key)     # every NaN pattern is above +inf's: one key for all


def _ties_to_lowest(mag: torch.Tensor, thr: torch.Tensor, K: int) -> torch.Tensor:
    """Keep ``mag > thr``, then the lowest-index entries ``== thr`` up to ``K`` per row."""
    above = mag > thr
    tie = mag == thr
    room = K - above.sum(1, keepdim=True, dtype=torch.int32)
    return above | (tie & (tie.cumsum(1, dtype=torch.int32) <= room))


def _select_torch(rows: torch.Tensor, K: int) -> torch.Tensor:
    """The ``[out, F]`` bool selection, vectorised over rows: threshold = the K-th largest
    magnitude of each row (``torch.topk`` values of the smaller side, unsorted: a selection, not
    a sort); keep ``>= threshold``; rows with more entries equal to the threshold than room keep
    the lowest-index ones. On CPU only those rows get the tie pass (the row check is a host
    sync, free there); elsewhere every row does, with no sync."""
    out, F = rows.shape
    if K == 0:
        return torch.zeros(out, F, dtype=torch.bool, device=rows.device)
    if K == F:
        return torch.ones(out, F, dtype=torch.bool, device=rows.device)
    mag = _magnitudes(rows)
    if K <= F - K + 1:     # the K-th largest = the smallest of the K largest ...
        thr = torch.topk(mag, K, dim=1, sorted=False).values.amin(1, keepdim=True)
    else:                  # ... = the largest of the F-K+1 smallest
        thr = torch.topk(mag, F - K + 1, dim=1, largest=False,
                         sorted=False).values.amax(1, keepdim=True)
    if mag.device.type != "cpu":
        return _ties_to_lowest(mag, thr, K)
    keep = mag >= thr
    surplus = torch.nonzero(torch.count_nonzero(keep, dim=1) > K).flatten()
    if surplus.numel():
        keep[surplus] = _ties_to_lowest(mag[surplus], thr[surplus], K)
    return keep


def _pack_torch(sel: torch.Tensor, K: int) -> torch.Tensor:
    """Kept column indices per row, increasing, ``[out, K]`` int32 (no host sync: each kept
    entry is scattered to its slot, the dropped ones to a spare column cut off afterwards)."""
    out, F = sel.shape
    slot = sel.cumsum(1, dtype=torch.int64) - 1
    slot = torch.where(sel, slot, torch.full_like(slot, K))
    cols = torch.arange(F, dtype=torch.int32, device=sel.device).expand(out, F)
    packed = torch.zeros(out, K + 1, dtype=torch.int32, device=sel.device)
    packed.scatter_(1, slot, cols)
    return packed[:, :K].contiguous()


def _topk_torch(rows, K, mask, idx):
    sel = _select_torch(rows, K)
    if mask is not None:
        mask.copy_(sel)
    if idx is not None:
        idx.copy_(_pack_torch(sel, K))


# --- Triton path -----------------------------------------------------------------------------
def _topk_triton(rows, K, mask, idx):
    out, F = rows.shape
    if F > MAX_TRITON_F:   # one block per row does not fit: the torch path for very wide rows
        _topk_torch(rows, K, mask, idx)
        return
    if F > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    row_stride = rows.stride(0) if out > 1 else F
    block = max(16, triton.next_power_of_2(F))
    # several rows per program while the tile stays <= 4096 elements (narrow rows: fewer, fuller
    # programs); under the interpreter the cost is per program, so tiles grow to 2^16 there
    tile = 65_536 if _backend.triton_interpret() else 4096
    rows_per = min(max(1, tile // block), triton.next_power_of_2(out))
    warps = 4 if block * rows_per <= 2048 else 8 if block * rows_per <= 8192 else 16
    # the bool mask is written as bytes (torch.bool is one byte, 0 or 1)
    dummy_mask = mask.view(torch.uint8) if mask is not None else \
        torch.empty(1, dtype=torch.uint8, device=rows.device)
    dummy_idx = idx if idx is not None else torch.empty(1, dtype=torch.int32, device=rows.device)
    _topk_rows_kernel[(triton.cdiv(out, rows_per),)](
        rows, dummy_mask, dummy_idx, out, F, K, row_stride,
        ROWS=rows_per, BLOCK=block, WITH_MASK=mask is not None, WITH_INDICES=idx is not None,
        IS64=rows.dtype == torch.float64, num_warps=warps)


# --- C++ path (CPU tensors) ----------------------------------------------------------------------
def _topk_cpp(rows, K, mask, idx):
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()       # the kernel takes any row stride, unit column stride
    _backend._C.topk_cpu(rows, K, mask, idx)


_IMPLS = {"triton": _topk_triton, "cpp": _topk_cpp, "torch": _topk_torch}


def _check(W, k, op: str) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"gradops.{op}: W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() == 0:
        raise ValueError(f"gradops.{op}: W must have at least one dimension (dim 0 = output "
                         f"neurons), got a 0-dim tensor")
    if W.dtype not in _FLOAT_W:
        raise TypeError(f"gradops.{op}: W must be floating point (float32, bfloat16, float16 or "
                        f"float64), got {W.dtype}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"gradops.{op}: k must be an int, got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"gradops.{op}: k must be >= 0, got {k}")


def _run(W, k, op, with_mask, with_indices):
    _check(W, k, op)
    rows = _as_rows(W)
    out, F = rows.shape
    K = min(k, F)
    mask = torch.empty(out, F, dtype=torch.bool, device=W.device) if with_mask else None
    idx = torch.empty(out, K, dtype=torch.int32, device=W.device) if with_indices else None
    backend = select_backend(op, W.device, 1)
    if K == 0:        # nothing kept (also covers F == 0); no kernel launch
        if mask is not None:
            mask.zero_()
    elif out > 0:
        _IMPLS[backend](rows, K, mask, idx)
    return mask, idx


@torch.library.custom_op("gradops::topk_mask", mutates_args=())
def _topk_mask_op(W: torch.Tensor, k: int) -> torch.Tensor:
    mask, _ = _run(W, k, "topk_mask", True, False)
    return mask.reshape(W.shape)


@_topk_mask_op.register_fake
def _(W, k):
    _check(W, k, "topk_mask")
    return W.new_empty(W.shape, dtype=torch.bool)


@torch.library.custom_op("gradops::topk_indices", mutates_args=())
def _topk_indices_op(W: torch.Tensor, k: int) -> torch.Tensor:
    _, idx = _run(W, k, "topk_indices", False, True)
    return idx


@_topk_indices_op.register_fake
def _(W, k):
    _check(W, k, "topk_indices")
    return W.new_empty((W.shape[0], torch.sym_min(k, _fan_in(W))), dtype=torch.int32)


def _index(k, op: str) -> int:
    """``k`` as a Python int (numpy and other integer scalars accepted; bool and float not)."""
    if isinstance(k, bool):
        raise TypeError(f"gradops.{op}: k must be an int, got bool")
    if isinstance(k, torch.Tensor):
        raise TypeError(f"gradops.{op}: k must be an int, got a Tensor (use int(k))")
    try:
        return operator.index(k)
    except TypeError:
        raise TypeError(f"gradops.{op}: k must be an int, got {type(k).__name__}") from None


def topk_mask(W: torch.Tensor, k: int) -> torch.Tensor:
    """Per-neuron top-``k`` magnitude mask of a weight (docs/methods.md#sparse-training): the
    parameter selection per neuron (PSN) of Zhang et al.'s sparse-training paper, Sec. 3.4.

    Args:
        W: weight, ``[out, ...]`` (Linear ``[out, in]``, conv ``[out, in, kh, kw]``, a 1-D vector
            is ``[out, 1]``); float32 / bfloat16 / float16 / float64, any layout. Only read (a
            parameter that requires grad is fine).
        k: entries kept per output neuron, ``>= 0``; ``K = min(k, F)`` with ``F`` = fan-in.

    Returns:
        bool tensor of ``W``'s shape: in each row of the ``[out, F]`` view, exactly ``K`` True, at
        the ``K`` largest ``|W|`` (compared in fp64 for fp64 ``W``, else in fp32); equal
        magnitudes go to the lower column index; NaN ranks largest, above ``+inf``.

    Raises:
        TypeError: for a ``W`` that is not a floating-point tensor, or a ``k`` that is not an int.
        ValueError: for a 0-dim ``W`` or a negative ``k``.
    """
    k = _index(k, "topk_mask")
    _check(W, k, "topk_mask")
    return torch.ops.gradops.topk_mask(W.detach(), k)


def topk_indices(W: torch.Tensor, k: int) -> torch.Tensor:
    """The packed form of :func:`topk_mask`: int32 ``[out, K]`` (``K = min(k, F)``), row ``r``
    the kept column indices of row ``r`` of ``W``'s ``[out, F]`` view, in increasing order.

    ``torch.zeros(out, F, dtype=bool).scatter_(1, idx.long(), True)`` is ``topk_mask(W, k)``
    viewed as ``[out, F]``; ``W.reshape(out, F).gather(1, idx.long())`` are the kept weights.

    Args:
        W: the weights, viewed as ``[out, F]`` (dimension 0 the rows).
        k: how many entries to keep per row (an int >= 0).

    Returns:
        int32 ``[out, min(k, F)]``.

    Raises:
        TypeError: for a ``W`` that is not a floating-point tensor, or a ``k`` that is not an int.
        ValueError: for a 0-dim ``W`` or a negative ``k``.
    """
    k = _index(k, "topk_indices")
    _check(W, k, "topk_indices")
    return torch.ops.gradops.topk_indices(W.detach(), k)
