"""MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..ops import combine as combine_rows
from ..ops import gram
from ._registry import ElementwiseMethod, Options, StepContext, register
from ._simplex import project_simplex

__all__ = ["MoCo", "MoCoOptions", "LAMBDA_UPDATES"]

LAMBDA_UPDATES = ("softmax", "simplex")
_CPU_BLOCK = 1 << 20  # elements of J per column block on CPU (a 4 MiB fp32 temporary, in L3)


def _bits_kept(finite: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """All bits set if ``finite`` else none (0-dim, the integer type of ``dtype``'s width):
    ANDed into a float's bits it keeps the value or makes it ``+0``, a select that a NaN cannot
    get through and that runs vectorised (``torch.where`` does not on CPU)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    return torch.where(finite, -1, 0).to(ints)


def _block_width(T: int, P: int) -> int:
    """Columns per block on CPU: ``_CPU_BLOCK`` elements, a multiple of 64 columns (whole
    SIMD vectors per row) unless ``P`` is smaller."""
    return min(max(P, 1), max(64, (_CPU_BLOCK // max(T, 1)) // 64 * 64))


@dataclass(frozen=True)
class MoCoOptions(Options):
    beta: float = 0.5               # beta: step size of the tracked gradients y (LibMTL's default)
    beta_sigma: float = 0.5         # beta_k = beta / k^beta_sigma
    gamma: float = 0.1              # gamma: step size of the weights lambda
    gamma_sigma: float = 0.5        # gamma_k = gamma / k^gamma_sigma
    rho: float = 0.0                # rho: l2 regularisation of lambda's update
    lambda_update: str = "softmax"  # "softmax" (LibMTL's) or "simplex" (the paper's projection)
    eps: float = 1e-8               # added to ||g_t|| in LibMTL's normalisation

    def check(self) -> None:
        if not 0 < self.beta <= 1:
            self.fail("beta", f"must be in (0, 1], got {self.beta}")
        for opt in ("beta_sigma", "gamma", "gamma_sigma", "rho", "eps"):
            v = getattr(self, opt)
            if not (v >= 0 and math.isfinite(v)):
                self.fail(opt, f"must be a finite float >= 0, got {v}")
        if self.lambda_update not in LAMBDA_UPDATES:
            self.fail("lambda_update", f"must be one of {LAMBDA_UPDATES}, got "
                      f"{self.lambda_update!r}")


@register
class MoCo(ElementwiseMethod):
    """MoCo: track each task's gradient with a moving average ``y_t`` and descend along the
    MGDA-like combination of the tracked gradients, whose weights follow a projected gradient
    step instead of a full min-norm solve (the paper's Algorithm 1; LibMTL's ``MoCo``, which is
    what this follows by default, step for step).

    At step ``k = 1, 2, ...`` with ``J = [g_1; ...; g_T]`` and the task losses ``L_t``:

    * ``h_t = g_t / (||g_t|| + eps) * L_t`` (LibMTL's normalisation, standing in for the
      paper's projection of ``y`` onto a bounded set ``Y_i``, Algorithm 1 line 5);
    * ``y <- y - beta_k (y - h)``, ``beta_k = beta / k^beta_sigma`` (Eq. 4 / line 5; ``y``
      starts at 0);
    * ``lambda <- softmax(lambda - gamma_k (Y Y^T + rho I) lambda)``,
      ``gamma_k = gamma / k^gamma_sigma`` (LibMTL's; ``lambda_update="simplex"`` uses the
      paper's Euclidean projection onto the simplex, Eq. 5 / line 6; ``lambda`` starts at
      ``1/T``);
    * the update is ``d = Y^T lambda`` (line 7), with the new ``y`` and ``lambda``.

    Scale: ``lambda`` lies on the simplex and each ``h_t`` has norm ``L_t``, so ``||d||`` is of
    the order of the losses, whatever ``||g_t||``: LibMTL's scale exactly (its learning rates
    carry over); TorchJD 0.18 has no MoCo. The update does not scale with ``J``
    (``scale_invariant = False``); under AMP the method unscales itself: with GradScaler's
    ``ctx.scale = s``, ``h_t = (g_t / s) / (||g_t|| / s + eps) L_t`` and the returned update
    is ``s d`` (the optimizer's ``unscale_`` then gives ``d``), so AMP runs match fp32 runs.

    State (``state_dict``: ``moco_y``, ``moco_lambda``, ``moco_step``): the tracked gradients
    ``y`` ``[T, P]`` in ``J``'s dtype on ``J``'s device (as large as ``J`` itself), ``lambda``
    ``[T]`` and the step count ``k``. A step whose gradients or losses are not finite (an AMP
    overflow) returns a NaN update and leaves ``y`` and ``lambda`` as they were, so the skipped
    step does not poison the moving averages (``k`` still counts it).

    Cost beyond the ``T`` backward passes: the ``[T, P]`` state (a second ``J`` in memory, kept
    between steps), per step four passes over ``[T, P]`` (the row norms, the moving-average
    update of ``y`` in place, the Gram of ``Y`` and the combine ``Y^T lambda``) and ``T x T``
    work; no ``[T, P]`` temporary (on CPU the update runs in column blocks of ``2^20``
    elements, whose temporary stays in cache; a non-finite step's update is masked to 0 by its
    bits, so ``y`` stays bit for bit); no second batch. Needs the task losses
    (``StepContext.losses``, which ``MTLOptimizer`` passes)."""

    name = "moco"
    display = "MoCo"
    paper = ("Fernando et al., Mitigating Gradient Bias in Multi-objective Learning: A "
             "Provably Convergent Approach, ICLR 2023")
    Options = MoCoOptions
    scale_invariant = False
    order = 200

    def __init__(self, options: MoCoOptions | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.y: torch.Tensor | None = None
        self.lam: torch.Tensor | None = None
        self.step = 0

    def combine(self, J: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        o = self.options
        if ctx.losses is None:
            raise ValueError("method 'moco' needs the task losses (StepContext.losses)")
        T = J.shape[0]
        if ctx.losses.shape != (T,):
            raise ValueError(f"method 'moco': got {tuple(ctx.losses.shape)} losses for a J "
                             f"of {T} tasks")
        y, lam = self._state(J, ctx.dtype)
        self.step += 1
        k = self.step
        beta_k = o.beta / k ** o.beta_sigma
        gamma_k = o.gamma / k ** o.gamma_sigma
        losses = ctx.losses.to(J.device, J.dtype)
        norms = torch.linalg.vector_norm(J, dim=1)                  # in AMP's scaled units
        eps = o.eps if ctx.scale is None else o.eps * ctx.scale.to(J.device, J.dtype)
        coef = (losses / (norms + eps))[:, None]                    # unscaled: s cancels
        finite = torch.isfinite(norms).all() & torch.isfinite(losses).all()
        P = J.shape[1]
        width = _block_width(T, P) if J.device.type == "cpu" else max(P, 1)
        keep = _bits_kept(finite, y.dtype)
        for a in range(0, P, width):     # column blocks: the temporary stays in the CPU's cache
            yb = y[:, a:a + width]
            t = J[:, a:a + width] * coef                            # h
            torch.sub(yb, t, out=t)                                 # y - h
            t.view(keep.dtype).bitwise_and_(keep)                   # +0 if not finite
            yb.add_(t, alpha=-beta_k)                               # y - beta_k (y - h), in place
        y_new = y
        A = gram(y_new).to(ctx.dtype)
        A = A + o.rho * torch.eye(T, dtype=A.dtype, device=A.device)
        arg = lam - gamma_k * (A @ lam)
        lam_new = torch.softmax(arg, dim=0) if o.lambda_update == "softmax" else \
            project_simplex(arg)
        lam_new = torch.where(finite, lam_new, lam)
        self.y, self.lam = y_new, lam_new
        d = combine_rows(y_new, lam_new.to(torch.float32 if J.dtype != torch.float64 else J.dtype))
        poison = torch.where(finite, torch.zeros((), dtype=d.dtype, device=d.device),
                             torch.full((), math.nan, dtype=d.dtype, device=d.device))
        if ctx.scale is not None:
            return d * ctx.scale.to(d.device, d.dtype) + poison
        return d + poison

    def _state(self, J: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``y`` and ``lambda`` on ``J``'s device (0 and ``1/T`` on the first step)."""
        T, P = J.shape
        if self.y is None:
            return (torch.zeros_like(J, memory_format=torch.contiguous_format),
                    torch.full((T,), 1.0 / T, dtype=dtype, device=J.device))
        if self.y.shape != (T, P) or self.lam.shape != (T,):
            raise ValueError(f"method 'moco': its state is for [T, P] = {list(self.y.shape)}, "
                             f"got J of shape {list(J.shape)}")
        return self.y.to(J.device, J.dtype), self.lam.to(J.device, dtype)

    def state_dict(self) -> dict[str, Any]:
        if self.y is None:
            return {}
        return {"moco_y": self.y.clone(), "moco_lambda": self.lam.clone(),
                "moco_step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            self.y, self.lam, self.step = None, None, 0
            return
        missing = {"moco_y", "moco_lambda", "moco_step"} - set(state)
        if missing:
            raise ValueError(f"method 'moco': state lacks {sorted(missing)}")
        self.y, self.lam = state["moco_y"].clone(), state["moco_lambda"].clone()
        self.step = int(state["moco_step"])
