"""Models and data shared by the MTLOptimizer tests: a small shared MLP encoder with one linear
head per task, its data, and its per-task Jacobian by plain ``torch.autograd.grad`` (the
independent oracle of the optimizer's per-task gradients)."""
import torch
from torch import nn


class MTLNet(nn.Module):
    """Shared MLP encoder + one linear head per task."""

    def __init__(self, T=3, d_in=7, hidden=13, d_feat=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_feat))
        self.heads = nn.ModuleList(nn.Linear(d_feat, 1) for _ in range(T))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def losses(self, x, ys):
        h = self.encoder(x)
        return torch.stack([((head(h).squeeze(-1) - y) ** 2).mean()
                            for head, y in zip(self.heads, ys)])


def make_data(T=3, n=32, d_in=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    ys = [torch.randn(n, generator=g) + t for t in range(T)]
    return x, ys


def per_task_jacobian(model, x, ys):
    """[T, P] per-task gradients of the encoder's parameters, by torch.autograd.grad."""
    losses = model.losses(x, ys)
    enc = list(model.encoder.parameters())
    rows = []
    for t in range(len(ys)):
        gs = torch.autograd.grad(losses[t], enc, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows), losses.detach()


def shared_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()])
