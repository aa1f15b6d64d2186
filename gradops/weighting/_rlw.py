"""Random loss weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._registry import LossMethod, Options, StepContext, register

__all__ = ["RLW", "RLWOptions", "softmax_draw"]

DISTRIBUTIONS = ("normal", "uniform")


def softmax_draw(T: int, distribution: str, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """``softmax(z)``, ``z [T]`` drawn from ``distribution`` (``"normal"``: N(0, 1);
    ``"uniform"``: U(0, 1)) by ``generator`` (None: the global one of ``device``), on
    ``device`` (float32; no host synchronisation). RLW's and RGW's random weights."""
    gdev = generator.device if generator is not None else device
    draw = torch.randn if distribution == "normal" else torch.rand
    return torch.softmax(draw(T, generator=generator, device=gdev), dim=0).to(device)


@dataclass(frozen=True)
class RLWOptions(Options):
    distribution: str = "normal"    # of the logits: N(0, 1) (LibMTL's) or U(0, 1)

    def check(self) -> None:
        self.check_choice("distribution", DISTRIBUTIONS)


@register
class RLW(LossMethod):
    """Each step draws loss weights ``lambda = softmax(z)``, ``z ~ N(0, I_T)`` (the paper's
    Sec. 3, Eq. 4 with the normal distribution; LibMTL's ``RLW``: ``softmax(randn(T))``), and
    the terms are ``lambda_t L_t``. The weights sum to 1, LibMTL's scale: the update is on
    average ``1/T`` of EW's sum, so LibMTL's learning rates carry over. ``distribution="uniform"``
    draws ``z ~ U(0, 1)`` instead (the paper's Table 9 compares distributions). The draws come
    from the optimizer's generator on the device (no host synchronisation; a resumed run draws
    the same weights). Cost: none beyond the losses."""

    name = "rlw"
    display = "RLW"
    paper = ("Lin et al., Reasonable Effectiveness of Random Weighting: A Litmus Test for "
             "Multi-Task Learning, TMLR 2022")
    Options = RLWOptions
    random = True
    order = 40

    def setup(self, T: int, device: torch.device) -> None:
        super().setup(T, device)
        self._w: torch.Tensor | None = None

    def draw(self, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """This step's weights ``[T]`` (float32).

        Args:
            generator: the generator to draw from (None: the global one of ``device``).
            device: the device of the result.

        Returns:
            ``softmax(z)`` of a draw ``z [T]`` from the option's distribution.
        """
        return softmax_draw(self.T, self.options.distribution, generator, device)

    def terms(self, losses: list[torch.Tensor], values: torch.Tensor, ctx: StepContext
              ) -> list[torch.Tensor]:
        w = self._w = self.draw(ctx.generator, values.device)
        return [w[t].to(loss.dtype) * loss for t, loss in enumerate(losses)]

    def loss_weights(self) -> torch.Tensor | None:
        return self._w
