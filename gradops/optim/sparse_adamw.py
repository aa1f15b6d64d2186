"""``SparseAdamW``: AdamW with moments stored only for the selected entries
(docs/methods.md#sparse-training).

For a weight ``W`` with a mask that selects the same number ``K`` of entries in every row of
``W`` viewed as ``[R, C]`` = ``[out, F]`` (PSN and ``"random"`` masks), the state is

* ``idx``: int32 ``[R, K]``, the selected column of each row, increasing (``gradops.topk_indices``'
  layout, here derived from the mask by :func:`gradops.sparse.mask_indices`);
* ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with ``amsgrad``): fp32 ``[R, K]``;
* ``step``: a CPU fp32 scalar tensor, as in ``torch.optim.AdamW``.

A mask with uneven rows (``"global"`` masks) is stored the same way with the weight viewed as
``[1, numel]`` (``idx`` is int64 only if ``numel >= 2**31``). Parameters without a mask (or with an
all-``True`` one: biases, heads, depthwise convs with ``F <= k``) get ordinary dense AdamW state of
their own dtype and are stepped by torch's functional AdamW (the code behind
``torch.optim.AdamW``); parameters with an all-``False`` mask get no moments and are never touched.

One step of a masked parameter reads ``grad`` and ``W`` at the ``R*K`` selected positions, does
AdamW's arithmetic in fp32 and scatters the new values into ``W``; entries outside the mask are
never read or written (no weight decay on them), so they stay bit-identical. The arithmetic is
``torch.optim.AdamW``'s single-tensor (``foreach=False``) path, in its order:

    step += 1
    w *= 1 - lr * weight_decay
    m.lerp_(g, 1 - beta1)                     # m + (1-beta1) * (g - m)
    v = v * beta2 + (1 - beta2) * g * g
    bc1 = 1 - beta1**step; bc2 = 1 - beta2**step        (Python floats)
    denom = sqrt(v) / sqrt(bc2) + eps         # sqrt(max(v_max, v)) with amsgrad
    w += -(lr / bc1) * (m / denom)

so for fp32 parameters the selected entries follow dense AdamW (with the frozen entries restored,
``SparseTraining``) to fp32 rounding. Kernels: a Triton kernel (one program per block of the
``R*K`` selected entries; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), a C++
kernel (``csrc/sparse_adamw_cpu.cpp``; CPU tensors, the default there: OpenMP over chunks of the
table, each gathering ``grad`` and updating the moments, taking the chunk's square roots, then
gathering, updating and scattering ``p``; AVX2 arithmetic) and a vectorised torch
path (``gather`` / elementwise / ``scatter_`` over the whole ``[R, K]`` table; no loop over rows),
the CPU fallback (parameters other than fp32 / bf16 / fp16, or no extension).
``gradops.use_backend("torch"|"cpp"|"triton")`` forces one. The C++ kernel does the torch path's
fp32 operations in its order, including the two fused multiply-adds torch's CPU kernels use
(``lerp_``: ``fma(1-beta1, g-m, m)``; ``addcmul_``: ``fma((1-beta2)*g, g, v)``), and takes its
square roots from torch's own CPU sqrt (MKL's ``vmsSqrt`` in MKL builds of torch, which is not
always correctly rounded), so on x86 CPUs with AVX2 (torch's AVX2 / AVX-512 kernels) it equals
the torch path bit for bit. Before the update it checks every index (``0 <= idx < C``).

Memory: :meth:`SparseAdamW.state_bytes`. For a masked weight with ``nnz = R*K`` selected
entries: ``8 * nnz`` bytes of moments (fp32; dense AdamW on an fp32 weight keeps ``8 * numel``)
plus ``4 * nnz`` bytes of index table; ``12 * nnz`` in all, i.e. ``1.5 * fraction`` of dense
AdamW's state for fp32 weights.
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import nn

from .. import _backend
from .._backend import register_op, select_backend
from .sparse_training import index_layout, resolve_masks

__all__ = ["SparseAdamW", "sparse_adamw_update"]

register_op("sparse_adamw", ("triton", "cpp", "torch"))

#: Parameter dtypes the C++ kernel takes (others use the torch path).
_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SPARSE_KEYS = ("idx", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

if _backend.triton_importable()[0]:
    import triton
    import triton.language as tl

    @triton.jit
    def _sparse_adamw_kernel(p_ptr, g_ptr, idx_ptr, m_ptr, v_ptr, vmax_ptr, N, K, C,
                             decay, beta1, beta2, w_lerp, one_minus_beta2, eps, neg_step_size,
                             bc2_sqrt,
                             DECAY: tl.constexpr, LERP_LOW: tl.constexpr, AMSGRAD: tl.constexpr,
                             MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
        """Program ``b`` updates selected entries ``b*BLOCK .. (b+1)*BLOCK`` of the ``[R, K]``
        table (flat index ``s = r*K + j`` -> weight position ``r*C + idx[r, j]``)."""
        s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = s < N
        col = tl.load(idx_ptr + s, mask=ok, other=0).to(tl.int64)
        pos = (s // K) * C + col
        g = tl.load(g_ptr + pos, mask=ok, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        w = tl.load(p_ptr + pos, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + s, mask=ok, other=0.0)
        v = tl.load(v_ptr + s, mask=ok, other=0.0)
        if DECAY:
            w = w * decay
        # torch's lerp: self + weight * (end - self) for |weight| < 0.5, else
        # end - (end - self) * (1 - weight)
        if LERP_LOW:
            m = m + w_lerp * (g - m)
        else:
            m = g - (g - m) * beta1
        v = v * beta2
        v = v + one_minus_beta2 * g * g
        if AMSGRAD:
            vmax = tl.maximum(tl.load(vmax_ptr + s, mask=ok, other=0.0), v)
            tl.store(vmax_ptr + s, vmax, mask=ok)
            denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
        else:
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        w = w + neg_step_size * tl.div_rn(m, denom)
        tl.store(m_ptr + s, m, mask=ok)
        tl.store(v_ptr + s, v, mask=ok)
        tl.store(p_ptr + pos, w.to(p_ptr.dtype.element_ty), mask=ok)


def _hyper(lr: float, beta1: float, beta2: float, step: float) -> tuple[float, float]:
    """AdamW's step size and sqrt(bias correction 2), as torch computes them (Python floats)."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    return step_size, bias_correction2_sqrt


def _update_triton(p, g, idx, m, v, vmax, *, lr, beta1, beta2, eps, weight_decay, step,
                   maximize):
    R, K = idx.shape
    N = R * K
    if N == 0:
        return
    C = p.numel() // R
    step_size, bc2_sqrt = _hyper(lr, beta1, beta2, step)
    block = 256 if _backend.triton_interpret() else 1024
    dst = p
    if _backend.triton_interpret() and p.dtype == torch.bfloat16:
        dst = p.float()   # the interpreter truncates fp32 -> bf16; round with torch instead
    _sparse_adamw_kernel[(triton.cdiv(N, block),)](
        dst, g, idx, m, v, vmax if vmax is not None else v, N, K, C,
        1 - lr * weight_decay, beta1, beta2, 1 - beta1, 1 - beta2, eps, -step_size, bc2_sqrt,
        DECAY=weight_decay != 0, LERP_LOW=abs(1 - beta1) < 0.5, AMSGRAD=vmax is not None,
        MAXIMIZE=maximize, BLOCK=block, num_warps=4)
    if dst is not p:
        p.copy_(dst)


def _update_torch(p, g, idx, m, v, vmax, *, lr, beta1, beta2, eps, weight_decay, step,
                  maximize):
    R, K = idx.shape
    if R * K == 0:
        return
    C = p.numel() // R
    index = idx.long()      # once per step: gather/scatter convert int32 indices on every call
    P2 = p.view(R, C)
    gs = g.view(R, C).gather(1, index)
    if maximize:
        gs.neg_()
    if gs.dtype != torch.float32:
        gs = gs.float()
    w = P2.gather(1, index)
    w = w.float() if w.dtype != torch.float32 else w
    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    m.lerp_(gs, 1 - beta1)
    v.mul_(beta2).addcmul_(gs, gs, value=1 - beta2)
    step_size, bc2_sqrt = _hyper(lr, beta1, beta2, step)
    # denom = sqrt(v) / bc2_sqrt + eps, written into gs's buffer (no longer needed)
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
    denom = torch.sqrt(vmax if vmax is not None else v, out=gs).div_(bc2_sqrt).add_(eps)
    w.addcdiv_(m, denom, value=-step_size)
    P2.scatter_(1, index, w if w.dtype == p.dtype else w.to(p.dtype))


def _update_cpp(p, g, idx, m, v, vmax, *, lr, beta1, beta2, eps, weight_decay, step, maximize):
    R, K = idx.shape
    if R * K == 0:
        return
    if p.dtype not in _CPP_DTYPES or g.dtype != p.dtype:
        _update_torch(p, g, idx, m, v, vmax, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay, step=step, maximize=maximize)
        return
    step_size, bc2_sqrt = _hyper(lr, beta1, beta2, step)
    g, idx = g.contiguous(), idx.contiguous()     # no-ops for SparseAdamW's tensors
    # the Python-float scalars of the torch path, rounded to fp32 in the kernel as torch does
    _backend._C.sparse_adamw_cpu(p, g, idx, m, v, vmax, weight_decay != 0, 1 - lr * weight_decay,
                                 1 - beta1, beta2, 1 - beta2, bc2_sqrt, eps, -step_size, maximize)


_IMPLS = {"triton": _update_triton, "cpp": _update_cpp, "torch": _update_torch}


def sparse_adamw_update(p: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor,
                        exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        max_exp_avg_sq: torch.Tensor | None, *, lr: float, beta1: float,
                        beta2: float, eps: float, weight_decay: float, step: float,
                        maximize: bool = False) -> None:
    """One AdamW update of the entries ``idx`` selects, in place (the kernel behind
    :class:`SparseAdamW`; ``step`` is the step count *after* incrementing).

    ``p`` and ``grad`` (contiguous, same shape) are viewed as ``[R, C]`` with ``R = idx.shape[0]``;
    ``idx`` int32/int64 ``[R, K]``; ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq`` fp32
    ``[R, K]``, contiguous. The arithmetic is AdamW's (Loshchilov & Hutter, "Decoupled Weight
    Decay Regularization", ICLR 2019), as ``torch.optim.AdamW``'s.

    Args:
        p: the parameter (updated in place at the selected entries).
        grad: its gradient.
        idx: the selected columns of each row ``[R, K]``.
        exp_avg: the first moments of the selected entries ``[R, K]`` (updated in place).
        exp_avg_sq: the second moments ``[R, K]`` (updated in place).
        max_exp_avg_sq: AMSGrad's running maximum ``[R, K]`` (updated in place), or None
            without AMSGrad.
        lr, beta1, beta2, eps, weight_decay, maximize: as ``torch.optim.AdamW``.
        step: the step count after incrementing (bias corrections).
    """
    backend = select_backend("sparse_adamw", p.device, 1)
    _IMPLS[backend](p, grad, idx, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1,
                    beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                    maximize=maximize)


def _functional_adamw() -> Callable[..., None]:
    """torch's functional AdamW: ``torch.optim.adam.adam(..., decoupled_weight_decay=True)``
    (torch >= 2.6) or ``torch.optim.adamw.adamw`` (older)."""
    import inspect

    from torch.optim import adam as _adam
    if "decoupled_weight_decay" in inspect.signature(_adam.adam).parameters:
        return lambda *a, **k: _adam.adam(*a, decoupled_weight_decay=True, **k)
    from torch.optim import adamw as _adamw
    return _adamw.adamw


_adamw_functional = _functional_adamw()


class SparseAdamW(torch.optim.Optimizer):
    """AdamW that keeps moments only for the entries selected by ``masks`` (see the module
    docstring for the layout, the arithmetic and the memory).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``.
        masks: ``{parameter: bool mask}`` (``True`` = trainable, ``None`` = dense), e.g.
            ``SparseMasks.for_params(module)``; or a :class:`gradops.sparse.SparseMasks` / a
            ``{name: mask}`` mapping with ``module=``. Parameters without a mask train densely.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW`` (``lr`` a float).
        foreach: for the parameters without a mask, which are stepped by torch's functional
            AdamW (``None``: torch's default, the foreach kernels for CUDA tensors).
        module: the module name-keyed masks refer to.

    Raises:
        ValueError: for a negative ``lr``, ``eps`` or ``weight_decay``, ``betas`` outside
            ``[0, 1)``, a non-contiguous masked parameter, name-keyed masks without ``module``, or a
            mask whose shape is not its parameter's.
        TypeError: for masks of the wrong type (keys, values), or a masked complex or sparse
            parameter.
        KeyError: for a mask name that is no parameter of ``module``.

    Entries outside the masks are never written: they stay bit-identical. ``state_dict()`` /
    ``load_state_dict()`` round-trip the packed state (index tables included, kept int32).
    """

    def __init__(self, params, masks: Any, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None,
                 module: nn.Module | None = None):
        if not 0.0 <= lr:
            raise ValueError(f"SparseAdamW: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"SparseAdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"SparseAdamW: invalid betas {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"SparseAdamW: invalid weight_decay {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)
        pmasks = resolve_masks(masks, module, "SparseAdamW")
        for p in chain.from_iterable(g["params"] for g in self.param_groups):
            m = pmasks.get(p)
            if m is None or bool(m.all()):
                continue
            if p.is_complex() or p.is_sparse:
                raise TypeError("SparseAdamW: masked parameters must be dense real tensors")
            if not p.is_contiguous():
                raise ValueError("SparseAdamW: masked parameters must be contiguous")
            self.state[p]["idx"] = index_layout(m)   # [out, K], or [1, nnz] for uneven rows

    def state_bytes(self) -> int:
        """Bytes of all state tensors (moments, index tables, step counters)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    def _init_state(self, p: torch.Tensor, state: dict, amsgrad: bool) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if "idx" in state:
            shape, kw = state["idx"].shape, dict(dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros(shape, **kw)
            state["exp_avg_sq"] = torch.zeros(shape, **kw)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros(shape, **kw)
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One AdamW step: the masked parameters' selected entries, the others densely.

        Args:
            closure: re-evaluates the model and returns the loss (as for any torch optimizer),
                or None.

        Returns:
            What the closure returned, or None.

        Raises:
            RuntimeError: for a sparse gradient.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, wd = float(group["eps"]), float(group["weight_decay"])
            amsgrad, maximize = bool(group["amsgrad"]), bool(group.get("maximize", False))
            dense: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SparseAdamW does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    self._init_state(p, state, amsgrad)
                if "idx" not in state:
                    dense[0].append(p)
                    dense[1].append(p.grad)
                    dense[2].append(state["exp_avg"])
                    dense[3].append(state["exp_avg_sq"])
                    if amsgrad:
                        dense[4].append(state["max_exp_avg_sq"])
                    dense[5].append(state["step"])
                    continue
                state["step"] += 1
                grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                sparse_adamw_update(p, grad, state["idx"], state["exp_avg"], state["exp_avg_sq"],
                                    state.get("max_exp_avg_sq") if amsgrad else None,
                                    lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                                    step=state["step"].item(), maximize=maximize)
            if dense[0]:   # parameters without a mask: torch's own AdamW step
                _adamw_functional(*dense, foreach=group.get("foreach"), amsgrad=amsgrad,
                                  beta1=beta1, beta2=beta2, lr=lr, weight_decay=wd, eps=eps,
                                  maximize=maximize)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but the packed state keeps its dtypes (int32 index
        tables, fp32 moments) instead of being cast to the parameter's dtype.

        Args:
            state_dict: a dict returned by :meth:`state_dict` of a SparseAdamW over the same
                parameters and masks.
        """
        saved_state = state_dict["state"]
        packed = {pid: {k: v for k, v in s.items() if k in _SPARSE_KEYS}
                  for pid, s in saved_state.items() if "idx" in s}
        sd = dict(state_dict)
        sd["state"] = {pid: ({k: v for k, v in s.items() if k not in _SPARSE_KEYS}
                             if pid in packed else s) for pid, s in saved_state.items()}
        # parameter ids of the saved groups, in order, map onto this optimizer's parameters
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        id_map = dict(zip(saved_ids, params))
        super().load_state_dict(sd)
        for pid, tensors in packed.items():
            p = id_map[pid]
            for k, v in tensors.items():
                self.state[p][k] = v.to(device=p.device).contiguous()
