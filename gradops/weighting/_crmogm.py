"""CR-MOGM (Zhou et al., "On the Convergence of Stochastic Multi-Objective Gradient Manipulation
and Beyond", NeurIPS 2022): an exponential moving average of another method's weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._registry import GramMethod, Options, StepContext, create_method, get_method, register

__all__ = ["CRMOGM", "CRMOGMOptions"]


@dataclass(frozen=True)
class CRMOGMOptions(Options):
    base: str = "mgda"              # the Gram-weighted method whose weights are smoothed
    alpha: float = 0.9              # EMA weight of the previous weights (TorchJD's default)

    def check(self) -> None:
        if not 0 <= self.alpha <= 1:
            self.fail("alpha", f"must be in [0, 1], got {self.alpha}")
        try:
            cls = get_method(self.base)
        except ValueError as e:
            self.fail("base", f"must name a registered method: {e}")
        if cls.kind != "gram" or cls.name == "crmogm":
            self.fail("base", f"must be a Gram-weighted method other than crmogm, got "
                      f"{cls.name!r} ({cls.kind})")


@register
class CRMOGM(GramMethod):
    """CR-MOGM's weight smoothing (Zhou et al., NeurIPS 2022, the "correlation-reduced" MOGM;
    TorchJD 0.18's ``CRMOGMWeighting``): with ``lambda^_k`` the weights of the ``base`` method
    (default MGDA, with the base's default options) on this step's Gram,

        ``lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda^_k``,  ``lambda_0 = lambda^_1``

    (so the first step returns ``lambda^_1``; ``alpha = 0`` is the base method, ``alpha = 1``
    freezes the first weights). The paper's Corollary 1 lets ``alpha_k`` grow toward 1 as the
    learning rate decays; here ``alpha`` is fixed, as TorchJD's default usage.

    Scale convention: the base's (MGDA: weights on the simplex, LibMTL's and TorchJD's scale);
    the average is linear, so whatever the base's learning rates are carry over. The base's
    status is passed through (its non-convergence is counted as such).

    State (``state_dict``): ``lambda_{k-1}`` ``[T]`` and whether it is set; a step whose base
    weights are non-finite returns them (non-finite) and leaves the state as it was. Cost: the
    base method's, plus ``O(T)``. ``scale_invariant`` is declared False so that under AMP the
    optimizer hands the base the unscaled Gram whatever the base."""

    name = "crmogm"
    display = "CR-MOGM"
    paper = ("Zhou et al., On the Convergence of Stochastic Multi-Objective Gradient "
             "Manipulation and Beyond, NeurIPS 2022")
    Options = CRMOGMOptions
    scale_invariant = False
    iterative = True

    def __init__(self, options: CRMOGMOptions | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        self.base = create_method(self.options.base)
        self.lam: torch.Tensor | None = None
        self.lam_set: torch.Tensor | None = None

    def weights(self, G: torch.Tensor, ctx: StepContext):
        lam_hat, status = self.base.weights(G, ctx)
        T = lam_hat.shape[0]
        prev, is_set = self.lam, self.lam_set
        if prev is None or prev.shape != (T,):
            prev = torch.zeros_like(lam_hat)
            is_set = torch.zeros((), dtype=torch.bool, device=lam_hat.device)
        prev = prev.to(device=lam_hat.device, dtype=lam_hat.dtype)
        is_set = is_set.to(lam_hat.device)
        prev = torch.where(is_set, prev, lam_hat)                    # lambda_0 = lambda^_1
        a = self.options.alpha
        lam = a * prev + (1.0 - a) * lam_hat
        finite = torch.isfinite(lam_hat).all()
        self.lam = torch.where(finite, lam, prev)
        self.lam_set = is_set | finite
        return lam, status

    def torchjd(self, T: int):
        """TorchJD's CRMOGMWeighting around the base's TorchJD weighting (None when the base
        has no TorchJD Gramian weighting)."""
        from torchjd.aggregation import CRMOGMWeighting, GramianWeightedAggregator
        agg = self.base.torchjd(T)
        inner = getattr(agg, "gramian_weighting", None)
        if inner is None:
            return None
        return GramianWeightedAggregator(CRMOGMWeighting(inner, alpha=self.options.alpha))

    def state_dict(self) -> dict[str, Any]:
        out = {} if self.lam is None else {"crmogm_lambda": self.lam.clone(),
                                           "crmogm_set": self.lam_set.clone()}
        base = self.base.state_dict()
        if base:
            out["crmogm_base"] = base
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lam = state.get("crmogm_lambda")
        self.lam = None if lam is None else lam.clone()
        s = state.get("crmogm_set")
        self.lam_set = None if s is None else s.clone()
        self.base.load_state_dict(state.get("crmogm_base", {}))
