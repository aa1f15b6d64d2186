"""GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
Dropout", NeurIPS 2020), parameter-gradient variant as in TorchJD and CAGrad's code
(docs/methods.md#graddrop).

Per column ``k`` of ``J`` (``[T, P]``): ``S_k = sum_t J_tk``, ``A_k = sum_t |J_tk|``, purity
``p_k = 0.5 (1 + S_k / A_k)`` (Eq. 1; ``0.5`` for a column of zeros, and ``S_k / ((1 + eps) A_k)``
with the optional relative ``eps``: the purity, hence the result, does not depend on the
gradients' scale), one uniform ``U_k``; keep the positive entries if
``p_k > U_k`` and the negative ones if ``p_k < U_k`` (Eq. 2), and
``g_k = sum_t (leak_t + (1 - leak_t) M_tk) J_tk`` (Eq. 3, with the leak of §3.2).

One fused pass: read ``J`` once, write ``g`` once (and the ``[T, P]`` masks when asked). The
uniform numbers come from Philox4x32-10 keyed by a 63-bit seed drawn from a ``torch.Generator``,
counter = column index, generated inside the kernel; every backend (Triton, C++, torch) produces
the same stream (``gradops.reference.philox_uniform_reference``), so a seed gives the same result
on CPU and GPU up to fp32 rounding of ``g``. ``noise`` (``[P]``) replaces the internal numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from .._backend import _C, register_op, select_backend
from .._validate import acc_dtype, check_matrix
from ..reference import graddrop_reference, philox_uniform_reference
from ._eager import plain_eager_cpu

__all__ = ["graddrop"]

# the kernels accumulate in float32: float64 J takes the torch path (float64 math)
register_op("graddrop", ("triton", "cpp", "torch"),
            dtypes={"triton": _backend.KERNEL_DTYPES, "cpp": _backend.KERNEL_DTYPES})
DEFAULT_EPS = 0.0   # relative (p = 0.5 (1 + S / ((1 + eps) A))): scale-free

if _backend.triton_importable()[0]:
    import triton
    import triton.language as tl

    @triton.jit
    def _graddrop_kernel(J_ptr, leak_ptr, seed_ptr, noise_ptr, out_ptr, mask_ptr,
                         T, P, row_stride, shrink,
                         BLOCK: tl.constexpr, HAS_NOISE: tl.constexpr, WITH_MASK: tl.constexpr):
        """Program ``b`` handles columns ``[b*BLOCK, (b+1)*BLOCK)``: a first loop over the rows
        accumulates S and A, a second applies the mask (the block's rows stay in cache)."""
        cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < P
        S = tl.zeros([BLOCK], dtype=tl.float32)
        A = tl.zeros([BLOCK], dtype=tl.float32)
        for t in range(T):
            x = tl.load(J_ptr + t * row_stride + cols, mask=ok, other=0.0).to(tl.float32)
            S += x
            A += tl.abs(x)
        # eps is relative (shrink = 1 / (1 + eps)); a column of zeros (0 / 0) has purity 0.5
        purity = 0.5 * (1.0 + tl.where(A == 0.0, 0.0, S / A) * shrink)
        if HAS_NOISE:
            u = tl.load(noise_ptr + cols, mask=ok, other=0.5)
        else:
            # columns 4j .. 4j+3 take the four words of Philox at counter j (BLOCK % 4 == 0)
            ctr = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
            u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), ctr)
            u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))
        keep_pos = purity > u
        keep_neg = purity < u
        g = tl.zeros([BLOCK], dtype=tl.float32)
        for t in range(T):
            x = tl.load(J_ptr + t * row_stride + cols, mask=ok, other=0.0).to(tl.float32)
            m = (keep_pos & (x > 0)) | (keep_neg & (x < 0))
            leak = tl.load(leak_ptr + t)
            g += (leak + (1.0 - leak) * m.to(tl.float32)) * x
            if WITH_MASK:
                tl.store(mask_ptr + t * P + cols, m, mask=ok)
        tl.store(out_ptr + cols, g.to(out_ptr.dtype.element_ty), mask=ok)


def _graddrop_triton(J, leak, seed, noise, out, mask, eps):
    T, P = J.shape
    if P == 0:
        return
    if P > 1 and J.stride(1) != 1:
        J = J.contiguous()
    row_stride = J.stride(0) if T > 1 else P
    block = 256 if _backend.triton_interpret() else 1024
    dst = _backend.interpreter_output(out)
    _graddrop_kernel[(triton.cdiv(P, block),)](
        J, leak, seed, noise if noise is not None else leak, dst,
        mask if mask is not None else dst, T, P, row_stride, 1.0 / (1.0 + eps),
        BLOCK=block, HAS_NOISE=noise is not None, WITH_MASK=mask is not None, num_warps=4)
    if dst is not out:
        out.copy_(dst)


def _graddrop_cpp(J, leak, seed, noise, out, mask, eps):
    _C.graddrop_cpu(J, leak, int(seed.item()), noise, out, mask, eps)


def _graddrop_torch(J, leak, seed, noise, out, mask, eps):
    if noise is None:
        noise = philox_uniform_reference(int(seed.item()), torch.arange(J.shape[1])).to(J.device)
    g, m = graddrop_reference(J, leak, noise, eps)
    out.copy_(g)
    if mask is not None:
        mask.copy_(m)


_IMPLS = {"triton": _graddrop_triton, "cpp": _graddrop_cpp, "torch": _graddrop_torch}


def _check(J, leak, seed, noise, eps) -> None:
    check_matrix(J, "graddrop")
    T, P = J.shape
    leak_dtypes = (torch.float32, torch.float64) if J.dtype == torch.float64 else (torch.float32,)
    if leak.shape != (T,) or leak.dtype not in leak_dtypes or leak.device != J.device:
        raise ValueError(f"gradops.graddrop: leak must be a float or a float32 [T] tensor (float64 "
                         f"too for float64 J) on J's device with T = {T}, got shape "
                         f"{tuple(leak.shape)}, {leak.dtype}, {leak.device}")
    if seed.shape != (1,) or seed.dtype != torch.int64:
        raise ValueError("gradops.graddrop: seed must be an int64 tensor of shape [1]")
    if noise is not None:
        if noise.shape != (P,):
            raise ValueError(f"gradops.graddrop: noise must be [P] = [{P}] (one uniform number per "
                             f"column), got shape {tuple(noise.shape)}")
        if noise.device != J.device:
            raise ValueError(f"gradops.graddrop: noise must be on J's device ({J.device}), "
                             f"got {noise.device}")
    if not eps >= 0:
        raise ValueError(f"gradops.graddrop: eps must be >= 0, got {eps}")


def _graddrop_impl(J: torch.Tensor, leak: torch.Tensor, seed: torch.Tensor,
                   noise: torch.Tensor | None, with_mask: bool, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(J, leak, seed, noise, eps)
    T, P = J.shape
    out = J.new_empty(P)
    mask = torch.empty((T, P) if with_mask else (0,), dtype=torch.bool, device=J.device)
    if noise is not None:  # float32 (float64 for float64 J: compared with float64 purities)
        noise = noise.to(acc_dtype(J.dtype)).contiguous()
    backend = select_backend("graddrop", J.device, T, J.dtype)
    _IMPLS[backend](J, leak.contiguous(), seed, noise, out, mask if with_mask else None, eps)
    return out, mask


@torch.library.custom_op("gradops::graddrop", mutates_args=())
def _graddrop_op(J: torch.Tensor, leak: torch.Tensor, seed: torch.Tensor,
                 noise: torch.Tensor | None, with_mask: bool, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return _graddrop_impl(J, leak, seed, noise, with_mask, eps)


@_graddrop_op.register_fake
def _(J, leak, seed, noise, with_mask, eps):
    _check(J, leak, seed, noise, eps)
    T, P = J.shape
    return J.new_empty(P), J.new_empty((T, P) if with_mask else (0,), dtype=torch.bool)


def _draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A 63-bit Philox seed from ``generator`` (the default generator of ``device`` when None),
    as an int64 ``[1]`` tensor on ``device``: drawing it advances the generator and needs no
    host synchronisation."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=gen_device)
    return seed if seed.device == device else seed.to(device, non_blocking=True)


def graddrop(J: torch.Tensor, *, leak: float | Sequence[float] | torch.Tensor = 0.0,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
             return_mask: bool = False, eps: float = DEFAULT_EPS
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GradDrop-combined gradient ``[P]`` of task gradients ``J`` ``[T, P]`` in one fused pass.

    GradDrop: Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout", NeurIPS 2020, applied to the parameter gradients (docs/methods.md#graddrop).

    Args:
        J: ``[T, P]`` float32 / bfloat16 / float16 (fp32 math), or float64 (fp64 math, on the
            torch path); rows may be strided.
        leak: ``leak_t`` in ``[0, 1]``, a float for all tasks or ``[T]``; ``leak = 1`` gives the
            plain sum of the task gradients, ``0`` (default) the paper's GradDrop.
        generator: source of the random seed (reproducible: the same generator state gives the
            same result, on every backend); default: the global generator of ``J``'s device.
        noise: ``[P]`` uniform numbers ``U_k`` to use instead (tests, external RNG).
        return_mask: also return the ``[T, P]`` bool masks ``M``.
        eps: relative: ``p_k = 0.5 (1 + S_k / ((1 + eps) A_k))`` (default 0, the paper's purity;
            columns of zeros get purity 0.5 without it). Scaling ``J`` by ``s > 0`` scales
            ``g`` by ``s`` for any ``eps`` (an absolute ``eps``, before 0.1, did not).

    Returns:
        ``g`` (``[P]``, ``J``'s dtype), or ``(g, mask)``.

    Raises:
        TypeError: for a ``J`` that is not a dense floating-point tensor, or a ``generator``
            that is not a ``torch.Generator``.
        ValueError: for a ``J`` that is not 2-D, a ``leak`` outside ``[0, 1]`` or of the wrong
            length, a ``noise`` of the wrong shape or device, or a negative ``eps``.

    NaN/Inf in a column of ``J`` reach that column of ``g`` (they are never dropped).
    """
    check_matrix(J, "graddrop")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"gradops.graddrop: generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    T = J.shape[0]
    leak_dtype = acc_dtype(J.dtype)    # float32 (float64 for float64 J)
    if type(leak) in (float, int) and 0 <= leak <= 1:
        # the common case, a number in range: one tensor op (each costs tens of microseconds
        # when the caches are cold, as they are after a pass over a large J)
        leak_t = torch.full((T,), leak, dtype=leak_dtype, device=J.device)
    elif isinstance(leak, torch.Tensor) and leak.device.type != "cpu":
        leak_t = leak.to(device=J.device, dtype=leak_dtype).reshape(-1)  # not read: no sync
    else:
        leak_t = torch.as_tensor(leak, dtype=leak_dtype).reshape(-1)
        if not bool(((leak_t >= 0) & (leak_t <= 1)).all()):
            raise ValueError(f"gradops.graddrop: leak must be in [0, 1], got {leak_t.tolist()}")
        leak_t = leak_t.to(J.device)
    if leak_t.numel() == 1:
        leak_t = leak_t.expand(T).contiguous()
    seed = torch.zeros(1, dtype=torch.int64, device=J.device) if noise is not None else \
        _draw_seed(generator, J.device)
    g, mask = _graddrop_raw(J, leak_t, seed, noise, return_mask, eps)
    return (g, mask) if return_mask else g


def _graddrop_raw(J: torch.Tensor, leak: torch.Tensor, seed: torch.Tensor,
                 noise: torch.Tensor | None, with_mask: bool, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.gradops.graddrop`` on prepared arguments (``leak`` ``[T]`` float32, or float64
    for float64 ``J``; ``seed`` int64 ``[1]``), or its implementation directly for a plain eager
    CPU call (see :mod:`gradops.ops._eager`)."""
    op = _graddrop_impl if plain_eager_cpu(J, leak, seed, noise) else torch.ops.gradops.graddrop
    return op(J, leak, seed, noise, with_mask, eps)
