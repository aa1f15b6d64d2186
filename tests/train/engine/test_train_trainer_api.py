"""The Trainer's public step API (``step``, ``losses``, ``clip_and_step``, ``add_step_callback``)
and the optimizers built from a config (:mod:`gradops.train.engine.optimizers`), which Recon's
conflict table shares with the Trainer."""
from __future__ import annotations

import pytest
import torch

from gradops.optim import MTLOptimizer, MTLStepInfo
from gradops.train import TrainConfig
from gradops.train.data import load_dataset
from gradops.train.engine.distributed import Dist
from gradops.train.engine.optimizers import inner_optimizer, mtl_optimizer
from gradops.train.engine.trainer import Trainer
from gradops.train.recon import search as recon_search

CFG = TrainConfig(epochs=1, train_limit=64, width=4, batch_size=32, threads=1)


def _trainer(cls: type[Trainer] = Trainer, **kw) -> Trainer:
    cfg = CFG.replace(**kw).validate()
    return cls(cfg, load_dataset(cfg.data), torch.device("cpu"), Dist())


def _batch(tr: Trainer):
    return tr.splits["train"].batch(torch.arange(32))


def test_step_callbacks_get_each_steps_info():
    tr = _trainer(method="pcgrad")
    seen: list = []
    tr.add_step_callback(seen.append)
    line = tr.train_epoch(1)
    assert len(seen) == 64 // 32
    assert all(isinstance(i, MTLStepInfo) and i.gram.shape == (tr.T, tr.T) for i in seen)
    # the trainer's own statistics still see every step (they run before the callbacks)
    assert line["gc"] is not None


def test_step_callbacks_get_none_for_stl():
    tr = _trainer(method="stl")
    seen: list = []
    tr.add_step_callback(seen.append)
    tr.step(*_batch(tr))
    assert seen == [None]


def test_step_returns_the_losses_before_the_step():
    tr = _trainer(method="ew")
    x, ys = _batch(tr)
    before, _ = tr.losses(tr.net, x, ys)
    w0 = [p.detach().clone() for p in tr.net.parameters()]
    values, outs = tr.step(x, ys)
    assert torch.equal(values, torch.stack([v.detach().float() for v in before]))
    assert set(outs) == {t.name for t in tr.tasks}
    assert any(not torch.equal(a, p) for a, p in zip(w0, tr.net.parameters()))


def test_losses_is_the_one_forward_of_a_step():
    """A subclass overriding :meth:`Trainer.losses` sees every forward of a step (the trainer
    benchmark times it so): FAMO's step and its extra no-grad forward."""
    calls: list = []

    class Counting(Trainer):
        def losses(self, module, x, ys):
            calls.append(torch.is_grad_enabled())
            return super().losses(module, x, ys)

    tr = _trainer(Counting, method="famo")
    tr.step(*_batch(tr))
    assert calls == [True, False]


@pytest.mark.parametrize("optim,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_inner_optimizer_follows_optim(optim, cls):
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = inner_optimizer(CFG.replace(optim=optim, lr=0.1, weight_decay=0.01), params)
    assert type(opt) is cls
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.01


def test_mtl_optimizer_wraps_the_inner_one():
    net = torch.nn.Linear(3, 2)
    inner = inner_optimizer(CFG, list(net.parameters()))
    opt = mtl_optimizer(CFG.replace(method="pcgrad-layer"), inner, net, None, None, None)
    assert isinstance(opt, MTLOptimizer)
    losses = [net(torch.ones(1, 3)).sum(), (net(torch.ones(1, 3)) ** 2).sum()]
    opt.zero_grad()
    assert opt.backward(losses) is not None


def test_conflict_table_uses_the_configs_optimizer(monkeypatch):
    """Recon's conflict table builds its optimizers as the Trainer does: ``--optim`` applies
    (it built Adam whatever ``--optim`` said)."""
    built: list = []
    real = recon_search.inner_optimizer

    def spy(cfg, params):
        opt = real(cfg, params)
        built.append(type(opt))
        return opt

    monkeypatch.setattr(recon_search, "inner_optimizer", spy)
    cfg = CFG.replace(method="pcgrad", optim="sgd", lr=0.05)
    ranking = [{"layer": name, "score": 0, "params": 0}
               for name in recon_search.encoder_layers(cfg)]
    table = recon_search.conflict_table(cfg, ranking, 1, 2)
    assert built == [torch.optim.SGD, torch.optim.SGD]      # before and after branching
    assert table["iters"] == 2 and table["method"] == "pcgrad"
