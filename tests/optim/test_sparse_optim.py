"""gradops.optim: SparseTraining's guarantee (entries outside the mask stay bit-identical under
SGD momentum/Nesterov, Adam, AdamW with weight decay, clipping, AMP), its Optimizer interface (LR
schedulers, GradScaler, closures, state_dict), and SparseAdamW (equal to dense AdamW with the
frozen entries held, compact state, the Triton and C++ kernels against the torch path)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gradops
from gradops.optim import SparseAdamW, SparseTraining, sparse_adamw_update
from gradops.sparse import mask_indices, psn_masks

HAS_CUDA = torch.cuda.is_available()


class Net(nn.Module):
    """A small conv + MLP encoder (shared, sparsified) and a head (trained fully)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.LayerNorm(32), nn.GELU(),
            nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than two, much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed=0, k=6):
    torch.manual_seed(seed)
    net = Net()
    masks = psn_masks(net.encoder, k=k)
    return net, masks


def data(n_batches=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n_batches)]


INNER = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                               weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_clip": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_amp": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def train(net, opt, batches, steps, *, clip=None, amp=False, scaler=None):
    for s in range(steps):
        x, y = batches[s % len(batches)]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(net(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def check_guarantee(net, masks, before, moved_min=0.5):
    params = dict(net.encoder.named_parameters())
    for n, mask in masks.items():
        p, p0 = params[n].detach(), before["encoder." + n]
        if mask is None:
            assert not torch.equal(p, p0), f"{n} (trained fully) did not move"
            continue
        assert torch.equal(p[~mask], p0[~mask]), f"{n}: a frozen entry changed"
        if mask.any():
            moved = (p[mask] != p0[mask]).float().mean().item()
            assert moved >= moved_min, f"{n}: only {moved:.2f} of the selected entries moved"
    assert not torch.equal(net.head.weight.detach(), before["head.weight"])


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("grad_masking", [True, False], ids=["masked_grads", "raw_grads"])
def test_frozen_entries_stay_bit_identical(inner, grad_masking):
    net, masks = make()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = SparseTraining(INNER[inner](net.parameters()), masks, net.encoder,
                         mask_grads=grad_masking, grad_hooks=grad_masking)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if inner == "adamw_amp" else None
    train(net, opt, data(), 200, clip=0.5 if inner == "adamw_clip" else None,
          amp=inner == "adamw_amp", scaler=scaler)
    check_guarantee(net, masks, before)


def test_without_the_wrapper_frozen_entries_move():
    """The control: AdamW's decoupled decay and momentum move entries whose gradient is 0."""
    net, masks = make()
    before = net.encoder[4].weight.detach().clone()
    mask = masks["4.weight"]
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    for x, y in data(2):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        net.encoder[4].weight.grad[~mask] = 0
        opt.step()
    assert not torch.equal(net.encoder[4].weight.detach()[~mask], before[~mask])


def test_grad_hooks_mask_before_clipping():
    net, masks = make()
    opt = SparseTraining(torch.optim.AdamW(net.parameters()), masks, net.encoder,
                         mask_grads=False)
    x, y = data(1)[0]
    nn.functional.cross_entropy(net(x), y).backward()
    for n, p in net.encoder.named_parameters():
        if masks[n] is not None:
            assert (p.grad[~masks[n]] == 0).all()
            if masks[n].any():
                assert (p.grad[masks[n]] != 0).any()
    opt.remove_hooks()
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    w = net.encoder[4]
    assert (w.weight.grad[~masks["4.weight"]] != 0).any()


def test_moments_of_frozen_entries_stay_zero():
    net, masks = make()
    inner = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt = SparseTraining(inner, masks, net.encoder)
    train(net, opt, data(), 5)
    w = net.encoder[4].weight
    st = inner.state[w]
    assert (st["exp_avg"][~masks["4.weight"]] == 0).all()
    assert (st["exp_avg_sq"][~masks["4.weight"]] == 0).all()


def test_shares_param_groups_and_state():
    net, masks = make()
    inner = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt = SparseTraining(inner, masks, net.encoder)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert opt.defaults is inner.defaults
    train(net, opt, data(), 2)
    assert len(opt.state) == len(list(net.parameters()))


def test_lr_scheduler_on_the_wrapper():
    net, masks = make()
    inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt = SparseTraining(inner, masks, net.encoder)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # e.g. "lr_scheduler.step() before optimizer.step()"
        for s, (x, y) in enumerate(data(6)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            sched.step()
            lrs.append(inner.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])
    check_guarantee(net, masks, before, moved_min=0.3)


def test_grad_scaler_skips_inf_steps_and_counts_only_selected_entries():
    net, masks = make()
    opt = SparseTraining(torch.optim.AdamW(net.parameters(), lr=1e-2), masks, net.encoder)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = data(1)[0]
    w, mask = net.encoder[4].weight, masks["4.weight"]
    # an inf in a selected entry: the step is skipped, nothing moves, the scale halves
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(net(x), y)).backward()
    w.grad[mask.nonzero()[0].unbind()] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p.detach(), before[n]) for n, p in net.named_parameters())
    assert scaler.get_scale() == 128.0
    # an overflow in a frozen entry of the loss's gradient is masked at accumulation (hook),
    # so it neither reaches the update nor skips the step
    opt.zero_grad()
    loss = nn.functional.cross_entropy(net(x), y)
    frozen_at = (~mask).nonzero()[0].unbind()
    loss = loss + w[frozen_at] * 1e38          # its scaled gradient overflows to inf
    scaler.scale(loss).backward()
    assert torch.isfinite(w.grad).all()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(w.detach()[mask], before["encoder.4.weight"][mask])
    assert torch.equal(w.detach()[~mask], before["encoder.4.weight"][~mask])


def test_closure():
    net, masks = make()
    opt = SparseTraining(torch.optim.LBFGS(net.parameters(), lr=0.1, max_iter=5), masks,
                         net.encoder)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = data(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
    assert torch.is_tensor(loss)
    check_guarantee(net, masks, before, moved_min=0.3)


def test_step_hooks_run():
    net, masks = make()
    opt = SparseTraining(torch.optim.SGD(net.parameters(), lr=0.1), masks, net.encoder)
    seen = []
    opt.register_step_post_hook(lambda o, a, k: seen.append(o))
    train(net, opt, data(), 2)
    assert seen == [opt, opt]


def test_state_dict_round_trip():
    net, masks = make()
    opt = SparseTraining(torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1), masks,
                         net.encoder)
    batches = data()
    train(net, opt, batches, 5)
    sd = copy.deepcopy(opt.state_dict())
    assert "sparse_training" in sd and "state" in sd and "param_groups" in sd
    net2 = copy.deepcopy(net)
    opt2 = SparseTraining(torch.optim.AdamW(net2.parameters(), lr=1.0), masks, net2.encoder)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 1e-2
    train(net, opt, batches, 5)
    train(net2, opt2, batches, 5)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_state_dict_mask_mismatch():
    net, masks = make(k=6)
    opt = SparseTraining(torch.optim.AdamW(net.parameters()), masks, net.encoder)
    sd = opt.state_dict()
    other = SparseTraining(torch.optim.AdamW(net.parameters()), psn_masks(net.encoder, k=5),
                           net.encoder)
    with pytest.raises(ValueError, match="masks"):
        other.load_state_dict(sd)
    # with the masks saved, loading adopts them (and snapshots the current values)
    saver = SparseTraining(torch.optim.AdamW(net.parameters()), masks, net.encoder,
                           save_masks=True)
    other.load_state_dict(saver.state_dict())
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    train(net, other, data(), 20)
    check_guarantee(net, masks, before, moved_min=0.3)


def test_extra_bytes():
    net, masks = make()
    ms = [m for m in masks.values() if m is not None and not m.all()]
    full_frozen = sum(m.numel() for m in ms if not m.any())
    partial = [m for m in ms if m.any()]
    # "full": a copy of every masked parameter + int32 index tables of the selected entries
    opt = SparseTraining(torch.optim.SGD(net.parameters(), lr=0.1), masks, net.encoder)
    got = opt.extra_bytes()
    assert got["snapshot"] == 4 * sum(m.numel() for m in ms)
    assert got["masks"] == 4 * sum(int(m.sum()) for m in partial)
    assert len(opt.masked_parameters()) == len(ms)
    # "packed": the frozen values + a bool mask of them
    opt = SparseTraining(torch.optim.SGD(net.parameters(), lr=0.1), masks, net.encoder,
                         snapshot="packed")
    got = opt.extra_bytes()
    assert got["snapshot"] == 4 * (full_frozen + sum(int((~m).sum()) for m in partial))
    assert got["masks"] == sum(m.numel() for m in partial)


@pytest.mark.parametrize("inner", ["sgd_momentum", "adamw_clip"])
def test_packed_snapshot_keeps_the_guarantee(inner):
    net, masks = make()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = SparseTraining(INNER[inner](net.parameters()), masks, net.encoder, snapshot="packed")
    train(net, opt, data(), 50, clip=0.5 if inner == "adamw_clip" else None)
    check_guarantee(net, masks, before)


def test_uneven_masks_use_one_row_over_the_weight():
    """"global" masks give rows different counts: the index table is [1, nnz] over the flat
    weight, and restore / gradient masking still hold."""
    torch.manual_seed(0)
    net = Net()
    masks = psn_masks(net.encoder, k=6, method="global")
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = SparseTraining(INNER["adamw"](net.parameters()), masks, net.encoder)
    m7 = masks["7.weight"]
    assert m7.any() and not torch.equal(m7.sum(1), m7.sum(1)[:1].expand(m7.shape[0]))
    e = opt._frozen[net.encoder[7].weight]
    assert e.idx.shape[0] == 1 and e.idx.shape[1] == int(m7.sum())
    assert torch.equal(e.frozen, ~m7)
    train(net, opt, data(), 50)
    check_guarantee(net, masks, before, moved_min=0.3)


def test_mask_argument_forms_and_errors():
    net, masks = make()
    by_param = masks.for_params(net.encoder)
    by_name = {n: m for n, m in masks.items()}
    for form, mod in ((masks, net.encoder), (by_param, None), (by_name, net.encoder)):
        opt = SparseTraining(torch.optim.SGD(net.parameters(), lr=0.1), form, mod)
        assert len(opt.masked_parameters()) == len(SparseTraining(
            torch.optim.SGD(net.parameters(), lr=0.1), by_param).masked_parameters())
        opt.remove_hooks()
    with pytest.raises(ValueError, match="module"):
        SparseTraining(torch.optim.SGD(net.parameters(), lr=0.1), masks)
    with pytest.raises(ValueError, match="shape"):
        SparseTraining(torch.optim.SGD(net.parameters(), lr=0.1),
                       {net.head.weight: torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        SparseTraining(torch.optim.SGD(net.parameters(), lr=0.1),
                       {net.head.weight: torch.ones_like(net.head.weight)})
    with pytest.raises(TypeError, match="Optimizer"):
        SparseTraining(object(), by_param)


# --- SparseAdamW ---------------------------------------------------------------------------------
def _sparse_vs_dense(method="psn", amsgrad=False, maximize=False, wd=0.1, steps=50):
    torch.manual_seed(0)
    net = Net()
    gen = torch.Generator().manual_seed(3)
    masks = psn_masks(net.encoder, k=6, method=method, generator=gen)
    net2 = copy.deepcopy(net)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd, amsgrad=amsgrad,
              maximize=maximize)
    dense = SparseTraining(torch.optim.AdamW(net.parameters(), foreach=False, **kw), masks,
                           net.encoder)
    sparse = SparseAdamW(net2.parameters(), masks, module=net2.encoder, **kw)
    batches = data()
    before = {n: p.detach().clone() for n, p in net2.named_parameters()}
    for s in range(steps):
        for n_, o in ((net, dense), (net2, sparse)):
            x, y = batches[s % len(batches)]
            o.zero_grad()
            nn.functional.cross_entropy(n_(x), y).backward()
            o.step()
    for (n, p), q in zip(net.named_parameters(), net2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    return net2, masks, before, sparse


@pytest.mark.parametrize("method", ["psn", "random", "global"])
def test_sparse_adamw_equals_dense_adamw_with_frozen_entries(method):
    net, masks, before, _ = _sparse_vs_dense(method)
    check_guarantee(net, masks, before)


@pytest.mark.parametrize("amsgrad,maximize,wd", [(True, False, 0.1), (False, True, 0.0)])
def test_sparse_adamw_options(amsgrad, maximize, wd):
    _sparse_vs_dense(amsgrad=amsgrad, maximize=maximize, wd=wd, steps=20)


def test_sparse_adamw_without_masks_is_torch_adamw():
    torch.manual_seed(0)
    net = Net()
    net2 = copy.deepcopy(net)
    ref = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    ours = SparseAdamW(net2.parameters(), {}, lr=1e-2, weight_decay=0.1)
    batches = data()
    train(net, ref, batches, 10)
    train(net2, ours, batches, 10)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_sparse_adamw_state_layout_and_bytes():
    net, masks, _, opt = _sparse_vs_dense(steps=2)
    dense_net = copy.deepcopy(net)
    dense = torch.optim.AdamW(dense_net.parameters())
    for x, y in data(1):
        nn.functional.cross_entropy(dense_net(x), y).backward()
    dense.step()
    dense_bytes = sum(t.numel() * t.element_size() for s in dense.state.values()
                      for t in s.values())
    params = dict(net.encoder.named_parameters())
    kept = idx_bytes = 0
    for n, m in masks.items():
        p = params[n]
        st = opt.state[p]
        if m is None or m.all():
            assert st["exp_avg"].shape == p.shape
            kept += p.numel()
            continue
        assert st["idx"].dtype == torch.int32
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg"].shape == st["idx"].shape
        if m.any():
            assert torch.equal(st["idx"], mask_indices(m))
        kept += int(m.sum())
        idx_bytes += st["idx"].numel() * 4
    total = sum(p.numel() for p in net.parameters())
    kept += sum(p.numel() for p in net.head.parameters())
    got = opt.state_bytes()
    assert got <= kept / total * dense_bytes + idx_bytes + 4 * len(opt.state)
    assert got < 0.75 * dense_bytes


def test_sparse_adamw_state_dict_round_trip():
    torch.manual_seed(0)
    net = Net()
    masks = psn_masks(net.encoder, k=6)
    opt = SparseAdamW(net.parameters(), masks, module=net.encoder, lr=1e-2)
    batches = data()
    train(net, opt, batches, 3)
    sd = copy.deepcopy(opt.state_dict())
    net2 = copy.deepcopy(net)
    opt2 = SparseAdamW(net2.parameters(), masks, module=net2.encoder, lr=5.0)
    opt2.load_state_dict(sd)
    w2 = net2.encoder[4].weight
    assert opt2.state[w2]["idx"].dtype == torch.int32
    assert opt2.state[w2]["exp_avg"].dtype == torch.float32
    train(net, opt, batches, 3)
    train(net2, opt2, batches, 3)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_sparse_adamw_bf16_params_keep_frozen_entries():
    torch.manual_seed(0)
    lin = nn.Linear(40, 24).to(torch.bfloat16)
    masks = psn_masks(lin, k=7)
    before = lin.weight.detach().clone()
    opt = SparseAdamW(lin.parameters(), masks, module=lin, lr=1e-2, weight_decay=0.1)
    for _ in range(10):
        opt.zero_grad()
        lin(torch.randn(8, 40, dtype=torch.bfloat16)).square().mean().backward()
        opt.step()
    m = masks["weight"]
    assert torch.equal(lin.weight.detach()[~m], before[~m])
    assert (lin.weight.detach()[m] != before[m]).float().mean() > 0.5


def test_sparse_adamw_with_grad_scaler_and_scheduler():
    torch.manual_seed(0)
    net = Net()
    masks = psn_masks(net.encoder, k=6)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = SparseAdamW(net.parameters(), masks, module=net.encoder, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for s in range(30):
        x, y = data()[s % 4]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    check_guarantee(net, masks, before)


def _kernel_case(R, C, K, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(R, C, generator=g).to(dtype)
    idx = torch.sort(torch.rand(R, C, generator=g).argsort(1)[:, :K], 1).values.to(torch.int32)
    grads = [torch.randn(R, C, generator=g).to(dtype) for _ in range(4)]
    return p.to(device), idx.contiguous().to(device), [x.to(device) for x in grads]


def _run_kernel(backend, p, idx, grads, amsgrad, maximize, wd):
    p = p.clone()
    m, v = (torch.zeros(idx.shape, device=p.device) for _ in range(2))
    vmax = torch.zeros(idx.shape, device=p.device) if amsgrad else None
    with gradops.use_backend(backend):
        for s, gr in enumerate(grads, 1):
            sparse_adamw_update(p, gr, idx, m, v, vmax, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                weight_decay=wd, step=s, maximize=maximize)
    return p, m, v, vmax


@pytest.mark.parametrize("R,C,K", [(1, 1000, 333), (7, 37, 11), (300, 5, 5), (4, 9, 0)])
@pytest.mark.parametrize("amsgrad,maximize,wd", [(False, False, 0.1), (True, True, 0.0)])
def test_triton_kernel_matches_torch_path(R, C, K, amsgrad, maximize, wd):
    if not gradops._backend.triton_available(torch.device("cpu")):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    p, idx, grads = _kernel_case(R, C, K, torch.float32)
    ref = _run_kernel("torch", p, idx, grads, amsgrad, maximize, wd)
    tri = _run_kernel("triton", p, idx, grads, amsgrad, maximize, wd)
    for a, b in zip(tri, ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sel = torch.zeros(p.shape, dtype=torch.bool).scatter_(1, idx.long(), True)
    assert torch.equal(tri[0][~sel], p[~sel])


def test_triton_kernel_bf16_param():
    if not gradops._backend.triton_available(torch.device("cpu")):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    p, idx, grads = _kernel_case(6, 50, 13, torch.bfloat16)
    ref = _run_kernel("torch", p, idx, grads, False, False, 0.1)
    tri = _run_kernel("triton", p, idx, grads, False, False, 0.1)
    torch.testing.assert_close(tri[0], ref[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=1e-6)


def test_sparse_adamw_triton_optimizer_matches_torch_optimizer():
    if not gradops._backend.triton_available(torch.device("cpu")):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    outs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        # no conv bias before a BatchNorm here: its gradient is rounding noise, which Adam
        # turns into +-lr steps that differ between any two summation orders
        net = nn.Sequential(nn.Flatten(), nn.Linear(108, 24), nn.Tanh(), nn.Linear(24, 3))
        masks = psn_masks(net, k=6)
        opt = SparseAdamW(net.parameters(), masks, module=net, lr=1e-2)
        with gradops.use_backend(backend):
            train(net, opt, data(), 3)
        outs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- the C++ kernel (CPU)
# --------------------------------------------------------------------------
needs_ext = pytest.mark.skipif(not gradops._backend.ext_available(),
                               reason="gradops._C not built (GRADOPS_NO_EXT=1)")
# torch's AVX2 / AVX-512 CPU kernels evaluate lerp_ and addcmul_ with fused multiply-adds, as the
# C++ kernel does, and the kernel takes its square roots from torch's own CPU sqrt (MKL's vmsSqrt
# in MKL builds, not always correctly rounded): there the two agree bit for bit, elsewhere to
# fp32 rounding.
EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _assert_same(a, b, exact=EXACT, rtol=1e-6, atol=1e-7):
    if exact:
        assert torch.equal(a, b), f"{(a != b).sum().item()} of {a.numel()} entries differ"
    else:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_cpp_is_the_default_on_cpu():
    cpu = gradops.info()["ops"]["sparse_adamw"]["cpu"]
    assert cpu["default"] == ("cpp" if gradops._backend.ext_available() else "torch")


@needs_ext
@pytest.mark.parametrize("R,C,K", [(1, 1000, 333), (7, 37, 11), (300, 5, 5), (4, 9, 0),
                                   (96, 768, 300), (130, 257, 77)])
@pytest.mark.parametrize("amsgrad,maximize,wd,beta1", [
    (False, False, 0.1, 0.9), (True, True, 0.0, 0.9), (True, False, 0.05, 0.9),
    (False, True, 0.1, 0.3)], ids=["plain", "amsgrad_maximize_nowd", "amsgrad", "maximize_beta1"])
def test_cpp_kernel_equals_torch_path(R, C, K, amsgrad, maximize, wd, beta1):
    """Random fp32 data, several steps: weights and moments equal the torch path's (bit for bit
    on AVX2 / AVX-512 CPUs); unselected weights untouched. Two threads (the module runs one)."""
    p, idx, grads = _kernel_case(R, C, K, torch.float32, seed=R + C + K)
    outs = {}
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for backend in ("torch", "cpp"):
            q = p.clone()
            g = torch.Generator().manual_seed(7)
            m = torch.randn(idx.shape, generator=g) * 0.01     # non-zero moments from the start
            v = torch.rand(idx.shape, generator=g) * 1e-4
            vmax = v + torch.rand(idx.shape, generator=g) * 1e-4 if amsgrad else None
            with gradops.use_backend(backend):
                for s, gr in enumerate(grads, 1):
                    sparse_adamw_update(q, gr, idx, m, v, vmax, lr=1e-2, beta1=beta1,
                                        beta2=0.999, eps=1e-8, weight_decay=wd, step=s,
                                        maximize=maximize)
            outs[backend] = (q, m, v, vmax)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(outs["cpp"], outs["torch"]):
        if b is not None:
            _assert_same(a, b)
    sel = torch.zeros(p.shape, dtype=torch.bool).scatter_(1, idx.long(), True)
    assert torch.equal(outs["cpp"][0][~sel], p[~sel])
    if K:
        assert (outs["cpp"][0][sel] != p[sel]).float().mean() > 0.9


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpp_kernel_half_params(dtype):
    p, idx, grads = _kernel_case(6, 50, 13, dtype)
    ref = _run_kernel("torch", p, idx, grads, False, False, 0.1)
    got = _run_kernel("cpp", p, idx, grads, False, False, 0.1)
    for a, b in zip(got, ref):
        if b is not None:
            _assert_same(a, b, rtol=1e-2, atol=1e-2)


@needs_ext
def test_cpp_kernel_int64_index_table_and_flat_layout():
    """A [1, nnz] table over the flat weight ("global" masks), int64 indices."""
    p, idx, grads = _kernel_case(1, 5000, 1234, torch.float32)
    ref = _run_kernel("torch", p, idx.long(), grads, True, False, 0.1)
    got = _run_kernel("cpp", p, idx.long(), grads, True, False, 0.1)
    for a, b in zip(got, ref):
        _assert_same(a, b)


@needs_ext
def test_cpp_kernel_float64_params_take_the_torch_path():
    p, idx, grads = _kernel_case(5, 40, 7, torch.float64)
    ref = _run_kernel("torch", p, idx, grads, False, False, 0.1)
    got = _run_kernel("cpp", p, idx, grads, False, False, 0.1)
    for a, b in zip(got, ref):
        if b is not None:
            assert torch.equal(a, b)


@needs_ext
def test_cpp_kernel_rejects_out_of_range_indices():
    p, idx, grads = _kernel_case(3, 20, 4, torch.float32)
    m, v = torch.zeros(idx.shape), torch.zeros(idx.shape)
    bad = idx.clone()
    bad[1, 2] = 20
    with gradops.use_backend("cpp"), pytest.raises(RuntimeError, match="outside"):
        sparse_adamw_update(p, grads[0], bad, m, v, None, lr=1e-2, beta1=0.9, beta2=0.999,
                            eps=1e-8, weight_decay=0.1, step=1)
    assert not m.any() and not v.any()


@needs_ext
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, True)])
def test_sparse_adamw_cpp_optimizer_equals_torch_optimizer(amsgrad, maximize):
    outs = []
    for backend in ("torch", "cpp"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(108, 24), nn.Tanh(), nn.Linear(24, 3))
        masks = psn_masks(net, k=6)
        opt = SparseAdamW(net.parameters(), masks, module=net, lr=1e-2, amsgrad=amsgrad,
                          maximize=maximize)
        with gradops.use_backend(backend):
            train(net, opt, data(), 5)
        outs.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*outs):
        _assert_same(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_on_gpu(dtype):
    p, idx, grads = _kernel_case(768, 3072, 300, dtype, device="cuda")
    ref = _run_kernel("torch", p, idx, grads, True, False, 0.1)
    tri = _run_kernel("triton", p, idx, grads, True, False, 0.1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(tri[0], ref[0], **tol)
    torch.testing.assert_close(tri[1], ref[1], rtol=1e-5, atol=1e-6)
    sel = torch.zeros(p.shape, dtype=torch.bool, device="cuda").scatter_(1, idx.long(), True)
    assert torch.equal(tri[0][~sel], p[~sel])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_sparse_training_and_sparse_adamw_on_gpu():
    torch.manual_seed(0)
    net = Net().cuda()
    masks = psn_masks(net.encoder, k=6)
    net2 = copy.deepcopy(net)
    dense = SparseTraining(torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1,
                                             foreach=False), masks, net.encoder)
    sparse = SparseAdamW(net2.parameters(), masks, module=net2.encoder, lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in net2.named_parameters()}
    for s in range(30):
        for n_, o in ((net, dense), (net2, sparse)):
            x, y = (t.cuda() for t in data()[s % 4])
            o.zero_grad()
            nn.functional.cross_entropy(n_(x), y).backward()
            o.step()
    for p, q in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    check_guarantee(net2, masks, before)
