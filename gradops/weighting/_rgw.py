"""Random gradient weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import _poison, _prep
from ._registry import GramMethod, StepContext, register
from ._rlw import RLWOptions, softmax_draw

__all__ = ["RGW", "RGWOptions"]

@dataclass(frozen=True)
class RGWOptions(RLWOptions):
    """RLW's options (``distribution`` of the logits: N(0, 1), TorchJD's ``Random``, or
    U(0, 1))."""


@register
class RGW(GramMethod):
    """Random gradient weighting: each step draws ``lambda = softmax(z)``, ``z ~ N(0, I_T)``,
    and the update is ``d = sum_t lambda_t g_t`` (the paper's Algorithm 2, the gradient
    counterpart of RLW's Algorithm 1, with the normal distribution of its Sec. 3 / Eq. 4).

    TorchJD 0.18's ``Random`` aggregator (``RandomWeighting``) is the same method:
    ``softmax(randn(m))`` applied to the rows of the Jacobian. Differences of convention: TorchJD
    draws from torch's global generator in the matrix's dtype; gradops draws float32 logits from
    the optimizer's generator (on the generator's device, then moved to ``G``'s device and cast
    to ``G``'s working dtype), so a run is reproducible and a resumed run draws the same
    weights. With the same seed and a float32 matrix the two give the same weights.

    Scale: the weights sum to 1 (LibMTL's and TorchJD's scale for random weighting): the
    update is on average ``1/T`` of EW's sum, so learning rates from the paper, LibMTL
    (``RLW``'s scale) and TorchJD carry over. The weights do not depend on ``G`` (only ``T``
    does), so the method is scale invariant. ``distribution="uniform"`` draws ``z ~ U(0, 1)``
    (the paper's Table 9 compares distributions).

    A NaN/Inf in ``G`` gives NaN weights (the random weights would otherwise hide it). State:
    none (the generator's state is the optimizer's). Cost: none beyond the Gram that the
    optimizer forms (``G`` is read for ``T`` and its finiteness only) and the combine."""

    name = "rgw"
    display = "RGW"
    paper = ("Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for "
             "Multi-Task Learning, TMLR 2022")
    Options = RGWOptions
    random = True
    order = 200

    def draw(self, T: int, generator: torch.Generator | None, device: torch.device
             ) -> torch.Tensor:
        """This step's weights ``[T]`` (float32, on ``device``).

        Args:
            T: the number of tasks.
            generator: the generator to draw from (None: the global one of ``device``).
            device: the device of the result.

        Returns:
            ``softmax(z)`` of a draw ``z [T]`` from the option's distribution.
        """
        return softmax_draw(T, self.options.distribution, generator, device)

    def weights(self, G: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, None]:
        G = _prep(G, "rgw")
        w = self.draw(G.shape[0], ctx.generator, G.device).to(G.dtype)
        return w + _poison(G), None

    def torchjd(self, T: int):
        from torchjd.aggregation import Random
        return Random()
