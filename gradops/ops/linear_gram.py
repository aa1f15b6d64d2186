"""Gram and weighted combination of a Linear layer's per-task weight gradients, from the layer's
input and its per-task output gradients, without forming the gradients.

For ``y = x W^T + b`` (``torch.nn.Linear``) applied to the ``N`` rows of ``X`` (``[N, in]``),
task ``t``'s gradient of ``W`` is ``g_t = D_t^T X`` (``[out, in]``), where ``D_t`` (``[N, out]``)
is task ``t``'s gradient with respect to the layer's output ``y``; the bias gradient is
``s_t = D_t^T 1``. Then (docs/methods.md#linear-engine, the Gram ``G = J J^T`` restricted to this
layer's columns)::

    <g_s, g_t> = tr(D_s^T X X^T D_t) = <L^T D_s, L^T D_t>,     K = X X^T = L L^T,

so the ``T x T`` Gram of the weight gradients is the Gram of the ``T`` matrices ``L^T D_t``
(``[N, out]`` each): ``N^2 in + T N^2 out + T^2 N out / 2`` multiply-adds instead of
``T^2 in out / 2`` over the gradients themselves, far fewer when ``N`` is small against ``in``
and ``T`` is large. This is the identity behind "autogram" (the Gramian computed from a
layer's activations and output gradients, e.g. TorchJD's ``autogram`` engine, and the per-sample
gradient norms of Goodfellow, "Efficient per-example gradient computations", 2015).
``L = V diag(sqrt(max(lambda, 0)))`` comes from the eigendecomposition ``K = V diag(lambda) V^T``
(``K`` is positive semi-definite; it may be singular, e.g. with ReLU's zero rows), computed in
float64, on CPU tensors at large ``T``; otherwise (``form="kernel"``) ``G[s, t] = <D_s, K D_t>``,
one more ``T^2 N out / 2`` but no decomposition (which on CUDA could synchronise with the
host). The
combined gradient ``sum_t w_t g_t`` is ``(sum_t w_t D_t)^T X``: one ``[out, N] x
[N, in]`` product instead of a pass over ``T`` gradients.

Used by :class:`gradops.optim.MTLOptimizer` (``linear_gram=``) for ``nn.Linear`` layers among
the shared parameters, where its cost model says it is cheaper than the pass over ``J``. Both
functions are compositions of torch operations (matrix products, ``torch.linalg.eigh``) and the
:func:`gradops.gram` op, on any device; their reference is
:func:`gradops.reference.linear_gram_reference` (the gradients formed explicitly).

Non-finite values propagate: a NaN or Inf in ``D`` reaches the Gram entries of its task (through
the Gram op), and a non-finite ``X`` makes the whole Gram NaN (the eigendecomposition runs on a
sanitised ``K``, and the result is then poisoned with ``0 * sum(K)``).
"""
from __future__ import annotations

import torch

from .gram import gram

__all__ = ["linear_combine", "linear_gram"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(X: torch.Tensor, D: torch.Tensor, op: str) -> None:
    for name, t, dim, shape in (("X", X, 2, "[N, in]"), ("D", D, 3, "[T, N, out]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gradops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"gradops.{op}: {name} must be {dim}-D {shape}, got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"gradops.{op}: {name} must be a floating tensor, got {t.dtype}")
    if D.shape[1] != X.shape[0]:
        raise ValueError(f"gradops.{op}: D's rows per task (D.shape[1] = {D.shape[1]}) must match "
                         f"X's rows (X.shape[0] = {X.shape[0]})")
    if D.shape[0] < 1:
        raise ValueError(f"gradops.{op}: D must hold at least one task (T >= 1), got shape "
                         f"{tuple(D.shape)}")
    if X.device != D.device:
        raise ValueError(f"gradops.{op}: X and D must be on one device, got {X.device} and "
                         f"{D.device}")
    if X.dtype != D.dtype:
        raise TypeError(f"gradops.{op}: X and D must have one dtype, got {X.dtype} and {D.dtype}")


def _rows_gram(R: torch.Tensor) -> torch.Tensor:
    """``R R^T`` of ``[T, M]`` rows: the Gram op (fp32 result) or, for float64, a matrix product."""
    if R.dtype == torch.float64:
        return R @ R.T
    return gram(R)


def linear_gram(X: torch.Tensor, D: torch.Tensor, bias: bool = False, *,
                form: str = "auto") -> torch.Tensor:
    """``G[s, t] = <D_s^T X, D_t^T X>``: the Gram of a Linear layer's per-task weight gradients.

    Args:
        X: ``[N, in]``, the layer's input rows (batch and any other leading dimensions
            flattened).
        D: ``[T, N, out]``, task ``t``'s gradient with respect to the layer's output, same rows.
        bias: also add the bias gradients' Gram, ``<D_s^T 1, D_t^T 1>`` (the Gram of the layer's
            weight and bias together).
        form: ``"eigh"``: the Gram of ``L^T D_t`` (``K = L L^T`` by ``torch.linalg.eigh``);
            ``"kernel"``: ``G[s, t] = <D_s, K D_t>`` (one more product of ``T^2 N out / 2``
            multiply-adds, symmetrised), which needs no decomposition: ``torch.linalg.eigh``
            may synchronise with a CUDA device, this form never does. ``"auto"`` (default):
            ``"eigh"`` on CPU tensors when the saved product outweighs the decomposition
            (``T^2 out > 64 N^2``, e.g. ``T > 16`` for ``N = 64``, ``out = 1024``),
            ``"kernel"`` otherwise.

    Returns:
        ``[T, T]`` in float32 (float64 for float64 inputs). Rounding differs from the Gram of the
        explicit gradients (fp32 products ``L^T D_t``; relative error ~1e-6 in float32).

    Costs ``N^2 in + T N^2 out + T^2 N out / 2`` multiply-adds (module docstring); when
    ``N >= in`` it forms the gradients ``D_t^T X`` instead, which is then no dearer.

    Raises:
        TypeError: for ``X`` or ``D`` that are not floating-point tensors of one dtype.
        ValueError: for shapes that do not match (``X [N, in]``, ``D [T, N, out]``, ``T >= 1``),
            tensors on two devices, or an unknown ``form``.
    """
    _check(X, D, "linear_gram")
    if form not in ("auto", "eigh", "kernel"):
        raise ValueError(f"gradops.linear_gram: form must be 'auto', 'eigh' or 'kernel', got "
                         f"{form!r}")
    T, N, out = D.shape
    if form == "auto":
        form = "eigh" if X.device.type == "cpu" and T * T * out > 64 * N * N else "kernel"
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    if N == 0:
        return torch.zeros(T, T, dtype=acc, device=X.device)
    if N >= X.shape[1]:
        Gw = torch.matmul(D.transpose(1, 2).to(acc), X.to(acc))     # the gradients, [T, out, in]
        G = _rows_gram(Gw.reshape(T, -1))
    elif form == "kernel":
        K = (X.to(torch.float64) @ X.to(torch.float64).T).to(acc)
        Da = D.to(acc)
        KD = torch.matmul(K, Da)                                     # K D_t, [T, N, out]
        G = Da.reshape(T, N * out) @ KD.reshape(T, N * out).T
        G = 0.5 * (G + G.T)
    else:
        K = X.to(torch.float64) @ X.to(torch.float64).T
        finite = torch.isfinite(K)
        lam, V = torch.linalg.eigh(torch.where(finite, K, 0.0))
        L = V * lam.clamp_min(0.0).sqrt()                            # K = L L^T
        R = torch.matmul(L.T.to(acc), D.to(acc))                     # L^T D_t, [T, N, out]
        G = _rows_gram(R.reshape(T, N * out))
        G = G + (0.0 * K.sum()).to(G.dtype)                          # non-finite X -> NaN
    if bias:
        G = G + _rows_gram(D.to(acc).sum(1))
    return G


def linear_combine(X: torch.Tensor, D: torch.Tensor, weights: torch.Tensor, *,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t w_t D_t^T X``: the weighted combination of a Linear layer's per-task weight
    gradients, as one product ``(sum_t w_t D_t)^T X``.

    Args:
        X: the layer's inputs ``[N, in]`` (as :func:`linear_gram`).
        D: the per-task output gradients ``[T, N, out]`` (as :func:`linear_gram`).
        weights: the task weights ``[T]``, on ``D``'s device.
        out: optional ``[out, in]`` contiguous destination in ``X``'s dtype (e.g. a view of a
            flat gradient buffer); written and returned.

    Returns:
        ``[out, in]``. The bias gradient's combination is ``weights @ D.sum(1)``.

    Raises:
        TypeError: for ``X`` or ``D`` that are not floating-point tensors of one dtype.
        ValueError: for shapes that do not match, ``weights`` or ``X`` on another device, or a
            bad ``out``.
    """
    _check(X, D, "linear_combine")
    T, N, n_out = D.shape
    if weights.dim() != 1 or weights.shape[0] != T:
        raise ValueError(f"gradops.linear_combine: weights must be [T] = [{T}], got shape "
                         f"{tuple(weights.shape)}")
    if weights.device != D.device:
        raise ValueError(f"gradops.linear_combine: weights must be on D's device ({D.device}), "
                         f"got {weights.device}")
    Dw = (weights.to(D.dtype) @ D.reshape(T, N * n_out)).view(N, n_out)
    if out is None:
        return Dw.T @ X
    if out.shape != (n_out, X.shape[1]) or out.dtype != X.dtype or not out.is_contiguous():
        raise ValueError(f"gradops.linear_combine: out must be a contiguous [{n_out}, "
                         f"{X.shape[1]}] {X.dtype} tensor, got {tuple(out.shape)} {out.dtype}")
    return torch.mm(Dw.T, X, out=out)
