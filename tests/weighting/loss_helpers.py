"""Shared set-up of the loss-level methods' tests: a set-up method object, and a tiny two-task
model trained through MTLOptimizer."""
from __future__ import annotations

import torch
from torch import nn

from gradops.optim import MTLOptimizer
from gradops.weighting import create_method


def setup_method(name: str, T: int, **options):
    """The method ``name`` set up for ``T`` tasks on the CPU."""
    m = create_method(name, options)
    m.setup(T, torch.device("cpu"))
    return m


class TwoTask(nn.Module):
    """A shared linear encoder and two heads; ``losses(x, y)`` gives the two task losses."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.encoder = nn.Linear(4, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.encoder(x))
        return [((head(h).squeeze(-1) - y[:, t]) ** 2).mean()
                for t, head in enumerate(self.heads)]


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def optimizer(model: nn.Module, method: str, lr: float = 0.1, **kw) -> MTLOptimizer:
    return MTLOptimizer(torch.optim.SGD(model.parameters(), lr=lr), method=method,
                        shared=model.encoder, **kw)
