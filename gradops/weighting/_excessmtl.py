"""ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._registry import ElementwiseMethod, Options, StepContext, register

__all__ = ["ExcessMTL", "ExcessMTLOptions"]

_H_EPS = 1e-7       # TorchJD's / LibMTL's / the authors' sqrt(S + 1e-7)
_BASE_EPS = 1e-7    # TorchJD's r / (r0 + 1e-7)
_CPU_BLOCK = 1 << 20  # elements of J per column block on CPU (4 MiB fp32 temporaries, in L3)


def _block_width(T: int, P: int) -> int:
    """Columns per block on CPU: ``_CPU_BLOCK`` elements, a multiple of 64 columns (whole
    SIMD vectors per row) unless ``P`` is smaller."""
    return min(max(P, 1), max(64, (_CPU_BLOCK // max(T, 1)) // 64 * 64))


def _bits_kept(finite: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All bits set if ``finite`` else none (0-dim, the integer type of ``dtype``'s width):
    ANDed into a float's bits it keeps the value or makes it ``+0``, a select that a NaN cannot
    get through and that runs vectorised (``torch.where`` does not on CPU)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    return torch.where(finite, -1, 0).to(ints)


def _squares_finite(J: torch.Tensor, dt: torch.dtype, s2: torch.Tensor | None) -> torch.Tensor:
    """Whether every ``J_ik^2 (/ s2)`` in ``dt`` is finite (0-dim bool), from ``max |J|`` alone:
    the rounded square (and its quotient by ``s2 >= 0``) is monotone in ``|J_ik|``, and a NaN
    in ``J`` (or in ``s2``) makes the maximum (the quotient) NaN. One read of ``J`` (a
    reduction), no ``[T, P]`` temporary, no host sync."""
    if J.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=J.device)
    lo, hi = torch.aminmax(J)          # (vector_norm(J, inf) is ~10x slower on CPU)
    m = torch.maximum(hi, -lo).to(dt)
    m2 = m * m
    return torch.isfinite(m2 if s2 is None else m2 / s2)


@dataclass(frozen=True)
class ExcessMTLOptions(Options):
    robust_step_size: float = 1e-2  # eta_alpha of Eq. 9 (LibMTL's default; TorchJD's is 1.0)
    n_warmup_steps: int = 0         # steps of uniform weights collecting the baseline (App. C.1)

    def check(self) -> None:
        if not self.robust_step_size > 0:
            self.fail("robust_step_size", f"must be > 0, got {self.robust_step_size}")
        if self.n_warmup_steps < 0:
            self.fail("n_warmup_steps", f"must be >= 0, got {self.n_warmup_steps}")


@register
class ExcessMTL(ElementwiseMethod):
    """ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024): task
    weights on the simplex updated by an exponentiated-gradient step on per-task excess-risk
    estimates, as TorchJD 0.18's ``ExcessMTLWeighting`` computes them:

    - ``S += g_i^2`` elementwise (AdaGrad's diagonal, their Eq. 7: ``H_i ~ diag(sqrt(S_i))``);
    - ``r_i = sum_k g_ik^2 / sqrt(S_ik + 1e-7)``, the excess risk ``g_i^T H_i^-1 g_i`` (Eq. 6);
    - scale processing (Sec. 3.2): ``r_i / (r0_i + 1e-7)``, ``r0`` the baseline excess risk: the
      first step's ``r`` (used raw on that step, TorchJD's reading of the authors' code) or, with
      ``n_warmup_steps > 0``, the mean ``r`` over the warm-up steps, whose weights are uniform;
    - ``lambda <- softmax(log lambda + eta r)`` (Eq. 9, in log space), ``lambda`` from ``1/T``.

    The update is ``d = sum_i w_i g_i`` with ``w = T lambda``: LibMTL's scale (its loss weights
    start at 1 and are renormalised to sum ``T``), gradops' EW sum convention, ``T`` times
    TorchJD's ``lambda`` (which sums to 1); so LibMTL's learning rates carry over and TorchJD's
    need dividing by ``T``. LibMTL differs on the first step only: it records ``r0`` without
    updating the weights (TorchJD, and this, update with the raw ``r``). The default step
    ``eta = 1e-2`` is LibMTL's (``--robust_step_size``); TorchJD's default is 1.0.

    Kind ``elementwise``: it reads ``J`` itself (the excess risks need ``g_i^2`` entrywise, not
    the Gram): a reduction (``max |J|``: whether the step is finite), one pass over ``J`` and
    ``S`` updating ``S`` in place (on CPU in column blocks of ``2^20`` elements whose
    temporaries stay in cache; no ``[T, P]`` temporary), then the combine. Under AMP the
    statistics use the unscaled ``J / scale``. Not invariant to ``J -> sJ`` (the raw first step
    and the ``1e-7``\\ s).

    State (``state_dict``): ``S`` ``[T, P]`` (a second copy of ``J``'s size: the method's memory
    cost), ``lambda`` ``[T]``, ``r0`` ``[T]`` and whether it is set, the warm-up sum ``[T]`` and
    the step count. A step whose ``J`` holds a NaN/Inf returns a non-finite update and leaves
    ``S``, ``lambda`` and ``r0`` as they were (one overflowed AMP step does not poison them).
    """

    name = "excessmtl"
    display = "ExcessMTL"
    paper = "He et al., Robust Multi-Task Learning with Excess Risks, ICML 2024"
    Options = ExcessMTLOptions
    scale_invariant = False

    def __init__(self, options: ExcessMTLOptions | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self._reset()

    def _reset(self) -> None:
        self.sq_grad_sum: torch.Tensor | None = None
        self.lam: torch.Tensor | None = None
        self.base: torch.Tensor | None = None
        self.base_set: torch.Tensor | None = None
        self.warmup_sum: torch.Tensor | None = None
        self.steps = 0

    def _ensure(self, T: int, P: int, device: torch.device, dtype: torch.dtype) -> None:
        S = self.sq_grad_sum
        if S is not None and S.shape == (T, P) and S.device == device and S.dtype == dtype:
            return
        if S is not None and S.shape != (T, P):
            raise ValueError(f"ExcessMTL: its state is for J of shape {tuple(S.shape)}, got "
                             f"[{T}, {P}]")
        if S is not None:                      # moved or cast (resumed on another device)
            self.sq_grad_sum = S.to(device, dtype)
            for k in ("lam", "base", "warmup_sum"):
                setattr(self, k, getattr(self, k).to(device, dtype))
            self.base_set = self.base_set.to(device)
            return
        self.sq_grad_sum = torch.zeros(T, P, dtype=dtype, device=device)
        self.lam = torch.full((T,), 1.0 / T, dtype=dtype, device=device)
        self.base = torch.zeros(T, dtype=dtype, device=device)
        self.base_set = torch.zeros((), dtype=torch.bool, device=device)
        self.warmup_sum = torch.zeros(T, dtype=dtype, device=device)
        self.steps = 0

    def step_weights(self, J: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Update the state with ``J`` (``[T, P]``, scaled by ``scale`` under AMP) and return
        this step's weights ``w = T lambda`` (``[T]``, sum convention)."""
        T, P = J.shape
        dt = torch.float64 if J.dtype == torch.float64 else torch.float32
        self._ensure(T, P, J.device, dt)
        s2 = None if scale is None else scale.to(dt) * scale.to(dt)
        finite = _squares_finite(J, dt, s2)
        r = torch.zeros(T, dtype=dt, device=J.device)
        S = self.sq_grad_sum
        keep = _bits_kept(finite, dt)
        width = _block_width(T, P) if J.device.type == "cpu" else max(P, 1)
        for a in range(0, P, width):     # column blocks: the temporaries stay in the CPU's cache
            Jb = J[:, a:a + width].to(dt)
            Sb = S[:, a:a + width]
            sq = Jb * Jb
            if s2 is not None:
                sq.div_(s2)
            tmp = torch.bitwise_and(sq.view(keep.dtype), keep).view(dt)  # sq, +0 if not finite
            Sb.add_(tmp)                                                 # S += sq in place
            den = torch.add(Sb, _H_EPS, out=tmp).sqrt_()
            r += sq.div_(den).sum(1)                                     # Eq. 6-7
        o = self.options
        if self.steps < o.n_warmup_steps:                             # host counter, no sync
            self.warmup_sum = self.warmup_sum + torch.where(finite, r, torch.zeros_like(r))
            self.steps += 1
            return T * self.lam + 0.0 * r                                # NaN J: NaN weights
        if self.steps == o.n_warmup_steps and o.n_warmup_steps > 0:
            self.base = self.warmup_sum / o.n_warmup_steps
            self.base_set = torch.ones_like(self.base_set)
        self.steps += 1
        rs = torch.where(self.base_set, r / (self.base + _BASE_EPS), r)   # Sec. 3.2
        self.base = torch.where(self.base_set | ~finite, self.base, r)
        self.base_set = self.base_set | finite
        lam = torch.softmax(torch.log(self.lam) + o.robust_step_size * rs, dim=0)   # Eq. 9
        self.lam = torch.where(finite, lam, self.lam)
        return T * lam

    def combine(self, J: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        w = self.step_weights(J, ctx.scale)
        return w.to(J.dtype) @ J

    def loss_weights(self) -> torch.Tensor | None:
        """The current weights ``T lambda`` (None before the first step)."""
        return None if self.lam is None else self.lam.shape[0] * self.lam

    def torchjd(self, T: int):
        """TorchJD's ExcessMTL (its weights are ``lambda``, these ``T lambda``)."""
        from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL
        return TorchJDExcessMTL(robust_step_size=self.options.robust_step_size,
                                n_warmup_steps=self.options.n_warmup_steps)

    def state_dict(self) -> dict[str, Any]:
        if self.sq_grad_sum is None:
            return {}
        return {"excessmtl_sq_grad_sum": self.sq_grad_sum.clone(),
                "excessmtl_lambda": self.lam.clone(), "excessmtl_base": self.base.clone(),
                "excessmtl_base_set": self.base_set.clone(),
                "excessmtl_warmup_sum": self.warmup_sum.clone(), "excessmtl_steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        if not state:
            return
        self.sq_grad_sum = state["excessmtl_sq_grad_sum"].clone()
        self.lam = state["excessmtl_lambda"].clone()
        self.base = state["excessmtl_base"].clone()
        self.base_set = state["excessmtl_base_set"].clone()
        self.warmup_sum = state["excessmtl_warmup_sum"].clone()
        self.steps = int(state["excessmtl_steps"])
