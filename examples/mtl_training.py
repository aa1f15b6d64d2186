"""Train a small shared encoder on T regression tasks with gradops.optim.MTLOptimizer, and time
the Linear engine (per-task gradients of Linear layers kept as factors) against the J path.

    .venv/bin/python examples/mtl_training.py [--T 8] [--steps 200] [--method pcgrad]
"""
import argparse
import time

import torch
from torch import nn

import gradops


def make_model(T: int, width: int = 256) -> tuple[nn.Module, nn.ModuleList]:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(T))
    return encoder, heads


def train(T: int, steps: int, method: str, linear_gram: str) -> tuple[list[float], float]:
    """The summed loss per step, and seconds per step after the first 10."""
    encoder, heads = make_model(T)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    targets = torch.randn(T, 64, 1, generator=g) + torch.linspace(-2, 2, T)[:, None, None]
    params = [*encoder.parameters(), *heads.parameters()]
    opt = gradops.optim.MTLOptimizer(torch.optim.AdamW(params, lr=1e-3), method=method,
                                     shared=encoder, linear_gram=linear_gram,
                                     generator=torch.Generator().manual_seed(0))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []
    start = time.perf_counter()
    for step in range(steps):
        if step == 10:                      # time from here: the first steps build buffers
            start = time.perf_counter()
        h = encoder(x)
        losses = torch.stack([nn.functional.mse_loss(head(h), y)
                              for head, y in zip(heads, targets)])
        opt.zero_grad()
        opt.backward(losses)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(losses.sum().item())
    return history, (time.perf_counter() - start) / max(1, steps - 10)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--method", default="pcgrad")
    a = ap.parse_args(argv)
    for mode in ("auto", "off"):
        hist, secs = train(a.T, a.steps, a.method, mode)
        print(f"linear_gram={mode!r:7s}: summed loss {hist[0]:.3f} -> {hist[-1]:.3f} in "
              f"{a.steps} steps, {secs * 1e3:.2f} ms/step (after 10 warm-up steps)")


if __name__ == "__main__":
    main()
