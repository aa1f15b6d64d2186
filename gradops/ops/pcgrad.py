"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020) in its Gram form.

Vector form (Alg. 1): for each task ``i``, ``g_i' = g_i``; for ``j`` in a random order,
if ``g_i' . g_j < 0`` then ``g_i' -= (g_i' . g_j) / ||g_j||^2 g_j``; result ``sum_i g_i'``.

Gram form (docs/methods.md#pcgrad): write ``g_i' = sum_k C_ik g_k`` with ``C = I``; then
``g_i' . g_j = (C G)_ij``, and the projection is ``C_ij -= (C G)_ij / (G_jj + eps)`` when negative.
Each row ``i`` evolves independently in ``T`` sequential steps of a length-``T`` update, on the
Gram's device with no host synchronisation; then ``w = 1^T C`` (sum; ``/ T`` for the mean) and
``g = w^T J``. ``pcgrad(J)`` is therefore one Gram pass over ``J``, a ``T x T`` recurrence and one
combine pass. In exact arithmetic this equals the vector form with the same orders.

Orders: ``perms[i]`` is the order in which task ``i`` visits the tasks, a permutation of all
``T`` tasks; the visit of ``j = i`` is skipped (the paper's Alg. 1, ``j != i``, and TorchJD's
``PCGrad``). ``libmtl_self_visit=True`` keeps it, LibMTL's convention: ``g_i' . g_i < 0`` does
occur after projections onto other tasks, and then the self-visit projects ``g_i'`` once more
(the results differ, by up to 8e-2 max|g| on random 20 x 10 problems). Random orders come from a
``torch.Generator``; ``perms`` gives them explicitly.
"""
from __future__ import annotations

import torch

from .. import _backend
from .._backend import _C, register_op, select_backend
from .._validate import _is_fake, acc_dtype, check_matrix
from ._eager import plain_eager_cpu
from .combine import combine
from .gram import gram, segment_gram

__all__ = ["pcgrad", "pcgrad_weights", "random_orders"]

REDUCTIONS = ("sum", "mean")
# the kernels run the recurrence in float32: a float64 G takes the torch path (float64 math)
register_op("pcgrad_weights", ("triton", "cpp", "torch"),
            dtypes={"triton": _backend.KERNEL_DTYPES, "cpp": _backend.KERNEL_DTYPES})

if _backend.triton_importable()[0]:
    import triton
    import triton.language as tl

    @triton.jit
    def _pcgrad_coefficients_kernel(G_ptr, perms_ptr, C_ptr, T, eps, BT: tl.constexpr,
                                    SELF_VISIT: tl.constexpr):
        """Program ``(b, i)``: row ``i`` of ``C`` for Gram ``b``, ``T`` sequential projections
        (``j = i`` skipped unless ``SELF_VISIT``)."""
        b = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1)
        ks = tl.arange(0, BT)
        ok = ks < T
        G_b = G_ptr + b * T * T
        c = tl.where(ks == i, 1.0, 0.0)
        for s in range(T):
            j = tl.load(perms_ptr + b * T * T + i * T + s)
            d = tl.sum(c * tl.load(G_b + ks * T + j, mask=ok, other=0.0))  # (C G)_ij
            den = tl.load(G_b + j * T + j) + eps
            coef = tl.where(d >= 0, 0.0, tl.where(den > 0, d / den, 0.0))   # NaN d stays NaN
            if not SELF_VISIT:
                coef = tl.where(j == i, 0.0, coef)
            c = tl.where(ks == j, c - coef, c)
        tl.store(C_ptr + b * T * T + i * T + ks, c, mask=ok)


def _coefficients_triton(G: torch.Tensor, perms: torch.Tensor, eps: float, self_visit: bool
                         ) -> torch.Tensor:
    B, T, _ = G.shape
    C = torch.empty_like(G)
    BT = max(16, 1 << (T - 1).bit_length())
    _pcgrad_coefficients_kernel[(B, T)](G, perms, C, T, eps, BT=BT, SELF_VISIT=bool(self_visit),
                                        num_warps=1)
    return C


def _coefficients_torch(G: torch.Tensor, perms: torch.Tensor, eps: float, self_visit: bool
                        ) -> torch.Tensor:
    """The same recurrence for all rows (and all Grams of the batch) at once, in torch."""
    B, T, _ = G.shape
    C = torch.eye(T, dtype=G.dtype, device=G.device).expand(B, T, T).clone()
    diag = G.diagonal(dim1=-2, dim2=-1)
    rows = torch.arange(T, device=G.device)
    for s in range(T):
        j = perms[:, :, s]                                           # [B, T]: task j for row i
        G_cols = torch.gather(G, 2, j[:, None, :].expand(B, T, T))  # [b, k, i] = G[b, k, j_i]
        d = (C * G_cols.transpose(1, 2)).sum(-1)                     # (C G)_{i j_i}
        den = torch.gather(diag, 1, j) + eps
        coef = torch.where(d >= 0, torch.zeros_like(d),
                           torch.where(den > 0, d / den, torch.zeros_like(d)))
        if not self_visit:
            coef = torch.where(j == rows, torch.zeros_like(coef), coef)
        C.scatter_add_(2, j[:, :, None], -coef[:, :, None])
    return C


def _coefficients_cpp(G: torch.Tensor, perms: torch.Tensor, eps: float, self_visit: bool
                      ) -> torch.Tensor:
    """The recurrence in C++ (``csrc/pcgrad_cpu.cpp``): no per-step torch dispatch on CPU."""
    return _C.pcgrad_coefficients_cpu(G, perms, eps, self_visit)


_COEFFICIENTS = {"triton": _coefficients_triton, "cpp": _coefficients_cpp,
                 "torch": _coefficients_torch}


def random_orders(T: int, batch: tuple[int, ...] = (), *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Random visiting orders ``[*batch, T, T]`` (row ``i``: a permutation of ``0..T-1``) drawn
    from ``generator`` (default: the global generator of ``device``), on ``device``.

    The ``perms`` of :func:`pcgrad_weights` (PCGrad's random task order, Yu et al., "Gradient
    Surgery for Multi-Task Learning", NeurIPS 2020).

    Args:
        T: the number of tasks.
        batch: leading batch dimensions (``(L,)`` for per-layer orders).
        generator: the generator to draw from (it may live on another device than ``device``:
            the orders are then copied).
        device: the device of the result (default: CPU).

    Returns:
        int64 ``[*batch, T, T]``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen_device = generator.device if generator is not None else device
    keys = torch.rand((*batch, T, T), generator=generator, device=gen_device)
    orders = torch.argsort(keys, dim=-1)
    return orders if orders.device == device else orders.to(device, non_blocking=True)


def _check_weights_args(G, perms, reduction, eps, self_visit,
                        kernel_checks_perms: bool = False) -> None:
    """Validate pcgrad_weights' arguments (reading the values of a CPU ``perms``, unless the C++
    kernel will: ``kernel_checks_perms``, it raises the same ValueError)."""
    if not isinstance(G, torch.Tensor) or G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError("gradops.pcgrad_weights: G must be a Gram [T, T] or a batch [..., T, T], "
                         "got "
                         f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    if not G.is_floating_point():
        raise TypeError(f"gradops.pcgrad_weights: G must be floating point, got {G.dtype}")
    T = G.shape[-1]
    if perms.dtype != torch.int64 or perms.shape != G.shape:
        raise ValueError(f"gradops.pcgrad_weights: perms must be int64 of G's shape "
                         f"{tuple(G.shape)} (row i = the order task i visits the tasks), got "
                         f"{perms.dtype} {tuple(perms.shape)}")
    if perms.device != G.device:
        raise ValueError(f"gradops.pcgrad_weights: perms must be on G's device ({G.device}), "
                         f"got {perms.device}")
    if not kernel_checks_perms:
        _check_permutations(perms, T)
    if reduction not in REDUCTIONS:
        raise ValueError(f"gradops.pcgrad_weights: reduction must be one of {REDUCTIONS}, "
                         f"got {reduction!r}")
    if not eps >= 0:
        raise ValueError(f"gradops.pcgrad_weights: eps must be >= 0, got {eps}")
    if not isinstance(self_visit, bool):
        raise ValueError(f"gradops.pcgrad_weights: libmtl_self_visit must be a bool, got "
                         f"{self_visit!r}")


def _check_permutations(perms: torch.Tensor, T: int) -> None:
    """Every row of a CPU ``perms`` is a permutation of ``0..T-1`` (values are not read while
    tracing, on fake tensors or on other devices)."""
    if perms.device.type == "cpu" and not torch.compiler.is_compiling() and \
            not _is_fake(perms) and perms.numel():
        expected = torch.arange(T).expand_as(perms)
        if not torch.equal(torch.sort(perms, dim=-1).values, expected):
            raise ValueError(f"gradops.pcgrad_weights: every row of perms must be a permutation "
                             f"of 0..{T - 1}")


def _pcgrad_weights_impl(G: torch.Tensor, perms: torch.Tensor, reduction: str, eps: float,
                         self_visit: bool) -> torch.Tensor:
    try:
        backend = select_backend("pcgrad_weights", G.device, G.shape[-1] if G.dim() else 0,
                                 G.dtype)
    except RuntimeError:  # a forced backend that cannot run: the argument errors come first
        backend = None
    _check_weights_args(G, perms, reduction, eps, self_visit, backend == "cpp")
    T = G.shape[-1]
    if backend == "cpp":
        # the C++ recurrence takes G's shape as it is and checks the permutations itself: a few
        # tensor ops fewer (each costs tens of microseconds with the caches cold after a pass
        # over a large J)
        if G.dtype != torch.float32 or not G.is_contiguous():
            G = G.to(torch.float32).contiguous()
        C = _C.pcgrad_coefficients_cpu(G, perms if perms.is_contiguous() else perms.contiguous(),
                                       eps, self_visit)
        w = C.sum(-2)
        return _nan_if_nonfinite(G, w / T if reduction == "mean" else w)
    if backend is None:  # now that the arguments are checked: the forced backend's error
        backend = select_backend("pcgrad_weights", G.device, T, G.dtype)
    batch = G.shape[:-2]
    G3 = G.to(acc_dtype(G.dtype)).reshape(-1, T, T).contiguous()   # float64 stays float64
    P3 = perms.reshape(-1, T, T).contiguous()
    C = _COEFFICIENTS[backend](G3, P3, eps, self_visit)
    w = C.sum(-2)
    if reduction == "mean":
        w = w / T
    return _nan_if_nonfinite(G, w.reshape(*batch, T))


def _nan_if_nonfinite(G: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w`` with NaN weights for every Gram of the batch that holds a NaN or Inf: the recurrence's
    comparisons are False for NaN (so a NaN on a diagonal, or ``T = 1``, would otherwise skip
    its steps and leave finite weights); a non-finite Gram must give non-finite weights."""
    bad = ~torch.isfinite(G).all(-1).all(-1)
    return w.masked_fill(bad.unsqueeze(-1), float("nan"))


@torch.library.custom_op("gradops::pcgrad_weights", mutates_args=())
def _pcgrad_weights_op(G: torch.Tensor, perms: torch.Tensor, reduction: str, eps: float,
                       self_visit: bool = False) -> torch.Tensor:
    return _pcgrad_weights_impl(G, perms, reduction, eps, self_visit)


@_pcgrad_weights_op.register_fake
def _(G, perms, reduction, eps, self_visit=False):
    _check_weights_args(G, perms, reduction, eps, self_visit)
    return G.new_empty(G.shape[:-1], dtype=acc_dtype(G.dtype))


def pcgrad_weights(G: torch.Tensor, *, generator: torch.Generator | None = None,
                   perms: torch.Tensor | None = None, reduction: str = "sum", eps: float = 0.0,
                   libmtl_self_visit: bool = False) -> torch.Tensor:
    """PCGrad's combination weights from the Gram: ``g_pcgrad = w^T J`` (docs/methods.md#pcgrad).

    PCGrad: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1.

    Args:
        G: ``[T, T]`` Gram (or a batch ``[..., T, T]``, e.g. per-layer Grams ``[L, T, T]``: one
            PCGrad per segment, weights ``[L, T]``).
        generator: source of the random orders (reproducible); default: the global generator of
            ``G``'s device.
        perms: explicit orders, int64 of ``G``'s shape: ``perms[..., i, :]`` is the order in which
            task ``i`` visits the tasks, a permutation of all ``T`` (its ``i`` is skipped unless
            ``libmtl_self_visit``).
        reduction: ``"sum"`` (the paper's and LibMTL's) or ``"mean"`` (Pytorch-PCGrad's).
        eps: added to ``||g_j||^2`` in the projection; zero gradients never project (their dot
            products are exactly 0), so the default 0 gives no NaN and keeps PCGrad scale-invariant.
        libmtl_self_visit: ``False`` (default): task ``i`` visits only ``j != i``, the paper's
            Alg. 1 (and TorchJD's). ``True``: it also visits itself, LibMTL's convention, which
            projects ``g_i'`` again when a projection made ``g_i' . g_i < 0``.

    Returns:
        float32 weights ``[..., T]`` (float64 for a float64 ``G``, computed in float64) on ``G``'s
        device. Non-finite ``G`` gives non-finite weights.

    Raises:
        TypeError: for a ``G`` that is not floating point.
        ValueError: for a ``G`` that is not ``[..., T, T]``, ``perms`` that are not int64
            permutations of ``G``'s shape on its device, an unknown ``reduction``, a negative
            ``eps``, or a ``libmtl_self_visit`` that is not a bool.
    """
    if perms is None:
        perms = random_orders(G.shape[-1], tuple(G.shape[:-2]), generator=generator,
                              device=G.device)
    if (isinstance(G, torch.Tensor) and isinstance(perms, torch.Tensor)
            and plain_eager_cpu(G, perms)):
        # the op's implementation, directly
        return _pcgrad_weights_impl(G, perms, reduction, eps, libmtl_self_visit)
    return torch.ops.gradops.pcgrad_weights(G, perms, reduction, eps, libmtl_self_visit)


def pcgrad(J: torch.Tensor, *, generator: torch.Generator | None = None,
           perms: torch.Tensor | None = None, reduction: str = "sum", eps: float = 0.0,
           libmtl_self_visit: bool = False,
           offsets: torch.Tensor | None = None, out: torch.Tensor | None = None,
           return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PCGrad-combined gradient of task gradients ``J`` ``[T, P]``: a Gram pass, the ``T x T``
    recurrence on device, and a combine pass (docs/methods.md#pcgrad; Yu et al., "Gradient
    Surgery for Multi-Task Learning", NeurIPS 2020).

    Args:
        J: ``[T, P]`` float32 / bfloat16 / float16 (fp32 math), or float64 (fp64 math throughout:
            Gram, weights and combination, on the torch path).
        generator, perms, reduction, eps, libmtl_self_visit: as in :func:`pcgrad_weights`
            (``perms`` is ``[T, T]``, or ``[L, T, T]`` with ``offsets``; the default follows the
            paper, ``j != i``; ``libmtl_self_visit=True`` is LibMTL's self-visit).
        offsets: per-layer PCGrad: one PCGrad per segment of this int64 ``[L+1]`` table
            (weights ``[L, T]``).
        out: optional ``[P]`` destination (e.g. a flat view over parameters' ``.grad``).
        return_weights: also return the weights (``[T]`` or ``[L, T]``).

    Returns:
        ``g`` ``[P]`` in ``J``'s dtype (or ``out``), or ``(g, weights)``.

    Raises:
        TypeError: for a ``J`` that is not a dense tensor of a supported floating dtype.
        ValueError: for a ``J`` that is not 2-D ``[T, P]``, and as :func:`segment_gram`,
            :func:`pcgrad_weights` and :func:`combine` for their arguments.
    """
    check_matrix(J, "pcgrad")
    G = gram(J) if offsets is None else segment_gram(J, offsets)
    w = pcgrad_weights(G, generator=generator, perms=perms, reduction=reduction, eps=eps,
                       libmtl_self_visit=libmtl_self_visit)
    g = combine(J, w, offsets, out=out)
    return (g, w) if return_weights else g
