"""The contenders of ``gradops bench --suite mtl`` (:mod:`gradops.bench.mtl` describes them): each
builds a fresh copy of a :class:`gradops.bench.models.MTLSetup`'s model and returns a closure
doing one whole training step (the floor's ``T`` backward passes, the summed loss, the batched
floor, :class:`gradops.optim.mtl.MTLOptimizer`, TorchJD). The suite's timing
(:mod:`gradops.bench.mtl`), its stage breakdown (:mod:`gradops.bench.mtl_breakdown`) and its
memory measure (:mod:`gradops.bench.mtl_memory`) all run these."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..optim.mtl import MTLOptimizer
from .models import MTLSetup


def floor_step(s: MTLSetup) -> Callable[[], None]:
    model, opt = s.fresh()
    T = s.T

    def step():
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        losses = s.losses(outs)
        for t, loss in enumerate(losses):
            loss.backward(retain_graph=t < T - 1)
        opt.step()
    step.model = model  # type: ignore[attr-defined]
    return step


def sum_step(s: MTLSetup) -> Callable[[], None]:
    model, opt = s.fresh()

    def step():
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        torch.stack(s.losses(outs)).sum().backward()
        opt.step()
    step.model = model  # type: ignore[attr-defined]
    return step


def batched_floor_step(s: MTLSetup) -> Callable[[], None]:
    model, opt = s.fresh()
    shared = list(model.encoder.parameters())
    heads = [p for h in model.heads for p in h.parameters()]
    eye = torch.eye(s.T, device=s.device)

    def step():
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        losses = torch.stack(s.losses(outs))
        rows = torch.autograd.grad(losses, shared, grad_outputs=eye, is_grads_batched=True,
                                   retain_graph=True)
        for p, r in zip(shared, rows):      # the summed update, as the floor's .grad holds
            p.grad = r.sum(0)
        hg = torch.autograd.grad(losses.sum(), heads)
        for p, g in zip(heads, hg):
            p.grad = g
        opt.step()
    step.model = model  # type: ignore[attr-defined]
    return step


def gradops_optimizer(s: MTLSetup, method: str, model: nn.Module, inner: torch.optim.Optimizer,
                      shared_as: str = "module", **kwargs):
    """MTLOptimizer over ``model``: ``shared=`` the encoder module (``shared_as="module"``) or
    the list of its parameters (``"params"``)."""
    shared = model.encoder if shared_as == "module" else list(model.encoder.parameters())
    return MTLOptimizer(inner, method=method, shared=shared,
                        generator=torch.Generator(device=s.device).manual_seed(0), **kwargs)


def gradops_step(s: MTLSetup, method: str, **kwargs) -> Callable[[], None]:
    model, inner = s.fresh()
    opt = gradops_optimizer(s, method, model, inner, **kwargs)

    def step():
        opt.zero_grad(set_to_none=True)
        _, outs = model(s.x)
        opt.backward(s.losses(outs))
        opt.step()
    step.optimizer = opt  # type: ignore[attr-defined]
    step.model = model  # type: ignore[attr-defined]
    return step


def torchjd_step(s: MTLSetup, aggregator) -> Callable[[], None]:
    from torchjd.autojac import jac_to_grad, mtl_backward
    model, opt = s.fresh()
    shared = list(model.encoder.parameters())
    heads = [list(h.parameters()) for h in model.heads]

    def step():
        opt.zero_grad(set_to_none=True)
        feats, outs = model(s.x)
        mtl_backward(s.losses(outs), features=feats, shared_params=shared, tasks_params=heads)
        jac_to_grad(shared, aggregator)
        opt.step()
    step.model = model  # type: ignore[attr-defined]
    return step
