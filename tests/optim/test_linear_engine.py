"""MTLOptimizer's Linear engine (``linear_gram=``): per-task gradients of ``nn.Linear`` layers
in factored form, checked against the path through ``J`` (the same step with
``linear_gram="off"``), and its rules (reused / tied layers, autocast, the cost model, hooks)."""
import pytest
import torch
from torch import nn

from gradops.optim import Distributed, MTLOptimizer
from mtl_helpers import MTLNet


# --- the Linear engine (linear_gram=): Gram and combine from activations ---------------------
class WideNet(nn.Module):
    """An encoder with a LayerNorm between Linear layers (a non-Linear shared parameter), a
    bias-free Linear, 3-D inputs [B, S, d], and a head that reads an intermediate feature (task 0
    does not reach the last encoder layer)."""

    def __init__(self, T=5, d=24, seed=0, reuse=False, tie=False):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.l2 = nn.Linear(d, d, bias=False)
        self.l3 = nn.Linear(d, d)
        self.encoder = nn.ModuleList([self.l1, self.norm, self.l2, self.l3])
        self.reuse, self.tie = reuse, tie
        self.heads = nn.ModuleList(nn.Linear(d, 1) for _ in range(T))

    def losses(self, x, ys):
        h1 = self.l2(torch.tanh(self.norm(self.l1(x))))
        if self.reuse:                  # l2 applied twice: its gradient sums two uses
            h1 = self.l2(torch.tanh(h1))
        h2 = self.l3(torch.tanh(h1))
        if self.tie:                    # l3's weight used once more, outside l3
            h2 = h2 + torch.tanh(h1) @ self.l3.weight.T * 0.5
        out = []
        for t, (head, y) in enumerate(zip(self.heads, ys)):
            feat = h1 if t == 0 else h2
            out.append(((head(feat).squeeze(-1) - y) ** 2).mean())
        return torch.stack(out)


def _run_engine(mode, method="pcgrad", T=5, steps=3, net_kw=None, **kw):
    model = WideNet(T=T, **(net_kw or {}))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 24, generator=g)          # N = 6 rows per Linear
    ys = [torch.randn(3, 2, generator=g) for _ in range(T)]
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method=method,
                       shared=model.encoder, linear_gram=mode,
                       generator=torch.Generator().manual_seed(0), **kw)
    infos, used = [], []
    for _ in range(steps):
        opt.zero_grad()
        infos.append(opt.backward(model.losses(x, ys)))
        used.append(opt._engine.last_active if opt._engine else 0)
        opt.step()
    return model, infos, used


def _assert_infos_match(i_off, i_on, method):
    """The engine's step infos (Grams, per-layer Grams, weights, conflict counts) equal the J
    path's, step by step."""
    for a, b in zip(i_off, i_on):
        for name in ("gram", "layer_gram", "weights", "layer_conflicts"):
            u, v = getattr(a, name), getattr(b, name)
            assert (u is None) == (v is None)
            if u is not None:     # (MGDA's weights: within its solver's tolerance)
                rtol = 5e-3 if name == "weights" and method == "mgda" else 1e-4
                torch.testing.assert_close(v, u, rtol=rtol, atol=1e-5 * u.abs().max().item())


@pytest.mark.parametrize("method,kw", [("pcgrad", {}), ("mgda", {"stats": True}),
                                       ("pcgrad", {"per_layer": True}), ("gradvac", {}),
                                       ("imtlg", {}), ("ew", {"stats": True}),
                                       ("nashmtl", {"update_every": 2})])
def test_linear_engine_matches_the_buffer_path(method, kw):
    m_off, i_off, _ = _run_engine("off", method, **kw)
    m_on, i_on, used = _run_engine("on", method, **kw)
    # MGDA's weights agree within its solver's tolerance only, and the parameters with them
    tol = dict(rtol=1e-3, atol=1e-5) if method == "mgda" else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(m_off.parameters(), m_on.parameters()):
        torch.testing.assert_close(p, q, **tol)
    _assert_infos_match(i_off, i_on, method)
    # every Linear layer of the encoder (3), on every step that recomputes the weights
    recompute = [True, False, True] if kw.get("update_every") else [True] * 3
    assert used == [3 if r else 0 for r in recompute]


def test_linear_engine_skips_reused_and_tied_layers():
    for net_kw, active in (({"reuse": True}, 2), ({"tie": True}, 2), ({}, 3)):
        m_off, i_off, _ = _run_engine("off", net_kw=net_kw)
        m_on, i_on, used = _run_engine("on", net_kw=net_kw)
        assert used == [active] * 3
        torch.testing.assert_close(i_on[-1].gram, i_off[-1].gram, rtol=1e-4, atol=1e-6)
        for p, q in zip(m_off.parameters(), m_on.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_linear_engine_is_off_under_autocast_and_after_unused_forwards():
    model = WideNet(T=3)
    x = torch.randn(3, 2, 24)
    ys = [torch.randn(3, 2) for _ in range(3)]
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method="pcgrad",
                       shared=model.encoder, linear_gram="on")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        L = model.losses(x, ys)
    opt.backward(L.float())
    assert opt._engine.last_active == 0
    model.losses(x, ys)                      # a forward whose graph is dropped ...
    with torch.no_grad():
        model.losses(x, ys)                  # (no-grad forwards do not count)
    opt.backward(model.losses(x, ys))        # ... makes every layer's use ambiguous
    assert opt._engine.last_active == 0
    opt.backward(model.losses(x, ys))
    assert opt._engine.last_active == 3


def test_linear_engine_cost_model_and_auto_mode():
    from gradops.optim._linear_engine import LinearEngine
    for T in (3, 8, 40):                                        # the benchmark's layers
        assert LinearEngine._cheaper(T, 64, 1024, 1024)
    assert not LinearEngine._cheaper(2, 64, 1024, 1024)         # ... at T = 1, 2: J is cheaper
    assert not LinearEngine._cheaper(1, 64, 1024, 1024)
    assert not LinearEngine._cheaper(40, 4096, 1024, 1024)      # many rows: J is cheaper
    _, _, used = _run_engine("auto", T=5, steps=1)               # 6 rows, 24 wide, T = 5: yes
    assert used == [3]
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    opt = MTLOptimizer(torch.optim.SGD([*model.parameters(), *heads.parameters()], lr=0.1),
                       method="mgda", shared=model)                       # 512 rows: no
    h = model(torch.randn(512, 8))
    opt.backward([hd(h).pow(2).mean() for hd in heads])
    assert opt._engine.last_active == 0
    h = model(torch.randn(512, 8))       # from the second step on, such layers keep no input
    assert all(l.x is None and l.edge is None for l in opt._engine.layers)
    opt.backward([hd(h).pow(2).mean() for hd in heads])
    assert opt._engine.last_active == 0


def test_linear_engine_overflow_propagates_and_the_step_is_skipped():
    model = WideNet(T=3)
    x = torch.randn(3, 2, 24)
    ys = [torch.randn(3, 2) for _ in range(3)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="pcgrad",
                       shared=model.encoder, linear_gram="on", grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    L = model.losses(x, ys)
    opt.backward(scaler.scale(torch.stack([L[0], L[1] * float("inf"), L[2]])))
    assert opt._engine.last_active == 3
    assert not torch.isfinite(model.l1.weight.grad).all()
    scaler.step(opt)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_linear_gram_errors_name_the_argument():
    model = MTLNet(T=3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="linear_gram must be one of"):
        MTLOptimizer(sgd, method="pcgrad", shared=model.encoder, linear_gram="yes")
    with pytest.raises(ValueError, match="single-process training only"):
        MTLOptimizer(sgd, method="pcgrad", shared=model.encoder, linear_gram="on",
                     distributed=Distributed(process_group=object()))
    masks = {model.encoder[0].weight: torch.rand(13, 7) > 0.5}
    with pytest.raises(ValueError, match="sparse masks"):
        MTLOptimizer(sgd, method="pcgrad", shared=model.encoder, linear_gram="on", sparse=masks)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["pcgrad", "mgda", "nashmtl"])
def test_linear_engine_on_gpu_matches_the_buffer_path(method):
    T = 6
    grads = {}
    for mode in ("off", "on"):
        model = WideNet(T=T).cuda()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(3, 2, 24, generator=g).cuda()
        ys = [torch.randn(3, 2, generator=g).cuda() for _ in range(T)]
        opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method=method,
                           shared=model.encoder, linear_gram=mode,
                           generator=torch.Generator(device="cuda").manual_seed(0))
        info = opt.backward(model.losses(x, ys))
        assert (opt._engine.last_active if opt._engine else 0) == (3 if mode == "on" else 0)
        grads[mode] = (torch.cat([p.grad.reshape(-1) for p in model.encoder.parameters()]),
                       info.gram)
    torch.testing.assert_close(grads["on"][0], grads["off"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["on"][1], grads["off"][1], rtol=1e-4, atol=1e-5)


def test_linear_engine_never_forms_the_per_task_weight_gradients():
    # bias-free layers, and a first layer whose input does not require grad: the passes still
    # produce D_t (the layers' outputs are backward inputs through their gradient edges)
    def build():
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(6, 10, bias=False), nn.Tanh(), nn.Linear(10, 4, bias=False))
        heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(4))
        return enc, heads
    x = torch.randn(5, 6)
    grads, calls = {}, {}
    for mode in ("off", "on"):
        enc, heads = build()
        opt = MTLOptimizer(torch.optim.SGD([*enc.parameters(), *heads.parameters()], lr=0.1),
                           method="pcgrad", shared=enc, linear_gram=mode,
                           generator=torch.Generator().manual_seed(0))
        n = [0]
        enc[0].weight.register_post_accumulate_grad_hook(lambda p: n.__setitem__(0, n[0] + 1))
        for step in range(2):
            h = enc(x)
            opt.zero_grad()
            opt.backward([hd(h).pow(2).mean() * (t + 1) for t, hd in enumerate(heads)])
            grads[mode, step] = [p.grad.clone() for p in enc.parameters()]
            opt.step()
        calls[mode] = n[0]
        if mode == "on":
            assert opt._engine.last_active == 2 and opt._J is None   # J never needed
    assert calls == {"off": 8, "on": 0}           # T = 4 per-task weight gradients per step
    for step in range(2):
        for a, b in zip(grads["off", step], grads["on", step]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_linear_engine_hooks_leave_with_the_optimizer():
    import gc
    model = WideNet(T=3)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="pcgrad",
                       shared=model.encoder, linear_gram="on")
    opt.backward(model.losses(torch.randn(3, 2, 24), [torch.randn(3, 2) for _ in range(3)]))
    assert len(model.l1._forward_hooks) == 1
    del opt
    gc.collect()
    assert all(not m._forward_hooks for m in model.modules())


def test_linear_engine_under_torch_compile_matches_the_buffer_path():
    x = torch.randn(3, 2, 24, generator=torch.Generator().manual_seed(1))
    ys = [torch.randn(3, 2, generator=torch.Generator().manual_seed(t)) for t in range(3)]
    out = {}
    for mode in ("off", "on"):
        torch._dynamo.reset()
        model = WideNet(T=3)
        opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method="pcgrad",
                           shared=model.encoder, linear_gram=mode,
                           generator=torch.Generator().manual_seed(0))
        losses = torch.compile(model.losses, backend="eager")
        for _ in range(3):
            opt.zero_grad()
            opt.backward(losses(x, ys))
            opt.step()
        if mode == "on":
            assert opt._engine.last_active == 3
        out[mode] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(out["off"], out["on"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["params", "auto", "module"])
def test_shared_as_parameters_finds_the_linear_layers(how):
    """shared= as a list of parameters (or "auto"): the engine finds the owning Linear modules on
    the first step's forward (or in module=), takes them, says so, and matches the J path; the
    discovery hook is gone after the first step."""
    from torch.nn.modules import module as module_mod
    m_off, i_off, _ = _run_engine("off")
    model = WideNet(T=5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 24, generator=g)
    ys = [torch.randn(3, 2, generator=g) for _ in range(5)]
    shared = {"params": list(model.encoder.parameters()), "auto": "auto",
              "module": list(model.encoder.parameters())}[how]
    hooks_before = len(module_mod._global_forward_hooks)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method="pcgrad",
                       shared=shared, linear_gram="on", generator=torch.Generator().manual_seed(0),
                       **({"module": model.encoder} if how == "module" else {}))
    assert "decided on the first step" in repr(opt) and opt.factored_layers == ()
    for step in range(3):
        opt.zero_grad()
        info = opt.backward(model.losses(x, ys))
        opt.step()
        assert len(module_mod._global_forward_hooks) == hooks_before
        assert set(map(id, opt.factored_layers)) == {id(model.l1), id(model.l2), id(model.l3)}
    torch.testing.assert_close(info.gram, i_off[-1].gram, rtol=1e-4, atol=1e-6)
    for p, q in zip(m_off.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.stats()["factored_layers"] == 3
    text = repr(opt)
    assert "of 3 Linear/Conv2d layers" in text
    assert ("0: Linear(24, 24)" if how == "module" else "shared[0]: Linear(24, 24)") in text


def test_discovery_skips_other_models_and_waits_for_a_forward():
    """Discovery adopts only Linear modules owning the optimizer's parameters; a forward run
    before the optimizer existed is missed, and the next step's forward is found instead."""
    from torch.nn.modules import module as module_mod
    model, other = WideNet(T=3), nn.Linear(24, 24)
    x = torch.randn(3, 2, 24)
    ys = [torch.randn(3, 2) for _ in range(3)]
    L = model.losses(x, ys)                            # before the optimizer: not seen
    hooks_before = len(module_mod._global_forward_hooks)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method="mgda",
                       shared=list(model.encoder.parameters()), linear_gram="on")
    other(x)
    opt.backward(L)
    assert opt.factored_layers == () and len(module_mod._global_forward_hooks) > hooks_before
    opt.backward(model.losses(x, ys))
    assert len(opt.factored_layers) == 3 and all(m is not other for m in opt.factored_layers)
    assert len(module_mod._global_forward_hooks) == hooks_before
    assert not other._forward_hooks
    opt2 = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method="mgda",
                        shared=list(model.encoder.parameters()), linear_gram="off")
    assert opt2.factored_layers == () and "factored_layers=[]" in repr(opt2)


# --- Conv2d layers in the engine: a convolution is a Linear layer on its unfolded patches ------
class ConvNet(nn.Module):
    """Convolutions of every kind the engine takes (stride, bias, rectangular kernel, dilation,
    ``padding="same"``) and a BatchNorm layer (J path), one it leaves to J (groups=2), and a
    head that reads an intermediate feature (task 0 does not reach the last convolutions)."""

    def __init__(self, T=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)   # (BatchNorm follows)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1),
                            bias=False)
        self.c3 = nn.Conv2d(8, 8, 3, padding="same")
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.encoder = nn.ModuleList([self.c1, self.bn1, self.c2, self.c3, self.grouped])
        self.heads = nn.ModuleList(nn.Linear(8 if t else 6, 2) for t in range(T))

    def losses(self, x, ys):
        h1 = torch.relu(self.bn1(self.c1(x)))
        h3 = self.grouped(torch.tanh(self.c3(torch.tanh(self.c2(h1)))))
        out = []
        for t, (head, y) in enumerate(zip(self.heads, ys)):
            feat = (h1 if t == 0 else h3).mean(dim=(-2, -1))
            out.append(((head(feat) - y) ** 2).mean())
        return torch.stack(out)


def _run_conv(mode, method="pcgrad", T=4, steps=3, unbatched=False, **kw):
    model = ConvNet(T=T)
    if unbatched:                       # Conv2d's [C, H, W] inputs (BatchNorm needs a batch)
        model.bn1 = model.encoder[1] = nn.Identity()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*(() if unbatched else (3,)), 3, 9, 10, generator=g)
    ys = [torch.randn(*(() if unbatched else (3,)), 2, generator=g) for _ in range(T)]
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method=method,
                       shared=model.encoder, linear_gram=mode,
                       generator=torch.Generator().manual_seed(0), **kw)
    infos = []
    for _ in range(steps):
        opt.zero_grad()
        infos.append(opt.backward(model.losses(x, ys)))
        opt.step()
    return model, opt, infos


@pytest.mark.parametrize("method,kw,unbatched", [
    ("pcgrad", {}, False), ("mgda", {"stats": True}, False), ("pcgrad", {"per_layer": True}, False),
    ("gradvac", {}, False), ("nashmtl", {}, False), ("imtlg", {}, True)])
def test_conv_layers_in_the_engine_match_the_buffer_path(method, kw, unbatched):
    m_off, _, i_off = _run_conv("off", method, unbatched=unbatched, **kw)
    m_on, opt, i_on = _run_conv("on", method, unbatched=unbatched, **kw)
    assert {id(m) for m in opt.factored_layers} == {id(m_on.c1), id(m_on.c2), id(m_on.c3)}
    for p, q in zip(m_off.parameters(), m_on.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    _assert_infos_match(i_off, i_on, method)
    text = repr(opt)
    for part in ("0: Conv2d(3, 6, 3x3, stride 2)", "2: Conv2d(6, 8, 3x2, stride (1, 2))",
                 "3: Conv2d(8, 8, 3x3)", "of 3 Linear/Conv2d layers"):
        assert part in text


def test_conv_engine_never_forms_the_per_task_weight_gradients():
    calls = {}
    for mode in ("off", "on"):
        model = ConvNet(T=3)
        n = [0]
        model.c2.weight.register_post_accumulate_grad_hook(lambda p: n.__setitem__(0, n[0] + 1))
        opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), method="mgda",
                           shared=model.encoder, linear_gram=mode)
        opt.backward(model.losses(torch.randn(2, 3, 9, 10), [torch.randn(2, 2)] * 3))
        calls[mode] = n[0]
    assert calls == {"off": 2, "on": 0}          # tasks 1 and 2 reach c2 (task 0 does not)


def test_conv_layers_the_engine_leaves_to_j():
    from gradops.optim._linear_engine import factorable
    assert factorable(nn.Conv2d(2, 4, 3, padding="same")) and factorable(nn.Conv2d(2, 4, 1))
    assert not factorable(nn.Conv2d(2, 4, 3, groups=2))              # grouped
    assert not factorable(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"))
    assert not factorable(nn.Conv2d(2, 4, 2, padding="same"))        # pads unevenly
    assert not factorable(nn.Conv1d(2, 4, 3)) and not factorable(nn.Conv3d(2, 4, 3))

    class MyConv(nn.Conv2d):
        pass
    assert not factorable(MyConv(2, 4, 3))                           # a subclass: its own rules


def test_conv_engine_cost_model_on_the_benchmark_cnn():
    """The mtl suite's CNN (batch 32, 32 x 32 inputs): only the last convolution (2 x 2 output
    pixels, 128 rows, 1152 x 256 weights: three quarters of the encoder's parameters) is cheaper
    in factored form, from T = 8 on; the wider feature maps stay in J."""
    from gradops.optim._linear_engine import LinearEngine
    layers = {1: (32 * 16 * 16, 27, 32), 2: (32 * 8 * 8, 288, 64), 3: (32 * 4 * 4, 576, 128),
              4: (32 * 2 * 2, 1152, 256)}
    for T in (3, 8, 40):
        taken = [i for i, (n, a, b) in layers.items() if LinearEngine._cheaper(T, n, a, b)]
        assert taken == ([] if T == 3 else [4])
