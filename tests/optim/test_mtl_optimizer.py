"""MTLOptimizer: the data path (per-task gradients -> method -> combined .grad), the
torch.optim.Optimizer contract (schedulers, state_dict, clipping, AMP), sparse training, and end to
end training with every method. The methods' own math is checked against independent references
in tests/weighting/test_<method>.py; here each method's combined gradient is checked against the
same method run on independently computed per-task gradients."""
import copy
import warnings

import pytest
import torch
from torch import nn

import gradops
from gradops import weighting
from gradops.ops.graddrop import _draw_seed
from gradops.ops.pcgrad import random_orders
from gradops.optim import Distributed, MTLOptimizer, SparseTraining
from gradops.weighting import gradvac_weights
from gradops.reference import graddrop_reference, pcgrad_reference, philox_uniform_reference
from method_references import gradvac_reference
from mtl_helpers import MTLNet, make_data, per_task_jacobian, shared_grad

GRAM_METHODS = ["mgda", "cagrad", "imtlg", "nashmtl", "alignedmtl"]
ALL_METHODS = ["ew", "pcgrad", "graddrop", *GRAM_METHODS, "gradvac"]


# --- the data path ----------------------------------------------------------------------------
@pytest.mark.parametrize("linear_gram", ["off", "on"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_combined_gradient_matches_method_on_reference_jacobian(method, linear_gram):
    # linear_gram="on": the Gram and the combine of both encoder layers from their inputs and
    # output gradients (5 rows < 7 and 13 inputs: the eigendecomposition path)
    T = 4
    model = MTLNet(T=T)
    x, ys = make_data(T, n=5 if linear_gram == "on" else 32)
    J, values = per_task_jacobian(model, x, ys)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                       shared=model.encoder, linear_gram=linear_gram)
    gen_state = opt._generator.get_state()
    opt.zero_grad()
    info = opt.backward(model.losses(x, ys))
    used = 2 if linear_gram == "on" and method not in ("ew", "graddrop") else 0  # one pass, no J
    assert (opt._engine.last_active if opt._engine else 0) == used
    g = shared_grad(model)
    gen = torch.Generator().set_state(gen_state)
    if method == "ew":
        ref = J.sum(0)
    elif method == "graddrop":
        seed = int(_draw_seed(gen, torch.device("cpu")))
        noise = philox_uniform_reference(seed, torch.arange(J.shape[1]))
        ref, _ = graddrop_reference(J, torch.zeros(T), noise)
    elif method == "pcgrad":
        perms = random_orders(T, generator=gen)
        ref = pcgrad_reference(J.double(), perms).float()
    elif method == "gradvac":
        perms = random_orders(T, generator=gen)
        ref, _ = gradvac_reference(J.double(), opt._offsets_cpu, perms,
                                   torch.zeros(opt.L, T, T, dtype=torch.float64), 0.5)
        ref = ref.float()
    else:
        w = weighting.get(method)(J.double() @ J.double().T)
        ref = (w @ J.double()).float()
        torch.testing.assert_close(info.weights, w.float(), rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(g, ref, rtol=2e-4, atol=2e-5)
    if method not in ("ew", "graddrop"):   # no Gram needed there without stats=True
        torch.testing.assert_close(info.gram, J @ J.T, rtol=1e-4, atol=1e-5)
    # task-specific heads: the plain sum of their tasks' gradients (each head sees one task)
    model2 = copy.deepcopy(model)
    model2.zero_grad()
    model2.losses(x, ys).sum().backward()
    for h1, h2 in zip(model.heads, model2.heads):
        for p1, p2 in zip(h1.parameters(), h2.parameters()):
            torch.testing.assert_close(p1.grad, p2.grad)


@pytest.mark.parametrize("linear_gram", ["off", "on"])
def test_per_layer_pcgrad_matches_vector_form_per_layer(linear_gram):
    T = 3
    model = MTLNet(T=T)
    x, ys = make_data(T, n=6)
    J, _ = per_task_jacobian(model, x, ys)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="pcgrad",
                       per_layer=True, shared=model.encoder, linear_gram=linear_gram)
    gen = torch.Generator().set_state(opt._generator.get_state())
    info = opt.backward(model.losses(x, ys))
    perms = random_orders(T, generator=gen)
    offs = opt._offsets_cpu.tolist()
    ref = torch.cat([pcgrad_reference(J[:, a:b].double(), perms).float()
                     for a, b in zip(offs[:-1], offs[1:])])
    torch.testing.assert_close(shared_grad(model), ref, rtol=2e-4, atol=2e-5)
    assert info.weights.shape == (opt.L, T)


@pytest.mark.parametrize("linear_gram", ["off", "on"])
def test_gradvac_targets_evolve_like_the_reference_over_steps(linear_gram):
    T = 3
    model = MTLNet(T=T)
    x, ys = make_data(T, n=6)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), method="gradvac", beta=0.3,
                       shared=model.encoder, linear_gram=linear_gram)
    tgt = torch.zeros(4, T, T, dtype=torch.float64)
    gen = torch.Generator().set_state(opt._generator.get_state())
    for _ in range(4):   # lr = 0: the same J every step, the targets move
        J, _ = per_task_jacobian(model, x, ys)
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        perms = random_orders(T, generator=gen)
        ref, tgt = gradvac_reference(J.double(), opt._offsets_cpu, perms, tgt, 0.3)
        torch.testing.assert_close(shared_grad(model), ref.float(), rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(opt.method.targets, tgt.float(), rtol=1e-4,
                               atol=1e-5)


def test_gradvac_weights_degenerate_inputs_have_no_nan():
    G = torch.zeros(2, 3, 3)
    G[1] = torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 0]])
    w, t = gradvac_weights(G, torch.full((2, 3, 3), 0.5), random_orders(3), 0.5, 1e-8)
    assert torch.isfinite(w).all() and torch.isfinite(t).all()


def test_list_and_stacked_losses_agree_and_stack_is_split():
    """A stacked 1-D loss tensor is split at the stack: task t's backward does not run through
    the other tasks' heads (counted with hooks), and the result equals the list form."""
    T = 3
    x, ys = make_data(T)
    grads = []
    for form in ("list", "stack"):
        model = MTLNet(T=T)
        calls = [0] * T
        for t, head in enumerate(model.heads):
            head.weight.register_hook(lambda g, t=t: calls.__setitem__(t, calls[t] + 1))
        opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="imtlg",
                           shared=model.encoder)
        L = model.losses(x, ys)
        opt.backward(list(L.unbind()) if form == "list" else L)
        grads.append(shared_grad(model))
        if form == "stack":
            assert calls == [1] * T
    torch.testing.assert_close(grads[0], grads[1])


def test_shared_auto_finds_the_encoder():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="pcgrad")
    opt.backward(model.losses(x, ys))
    assert [id(p) for p in opt._shared] == [id(p) for p in model.encoder.parameters()]
    assert opt.P == sum(p.numel() for p in model.encoder.parameters())


def test_buffers_are_allocated_once_and_grads_are_views_of_them():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="cagrad")
    opt.backward(model.losses(x, ys))
    J_ptr, g_ptr = opt._J.data_ptr(), opt._g.data_ptr()
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
    assert opt._J.data_ptr() == J_ptr and opt._g.data_ptr() == g_ptr
    for p in model.encoder.parameters():
        assert p.grad.untyped_storage().data_ptr() == opt._g.untyped_storage().data_ptr()


def test_per_task_rows_of_J_are_the_task_gradients_and_hooks_are_removed():
    """Row t of J is task t's gradient of the shared parameters (written by post-accumulate-grad
    hooks as autograd produces it), zero where task t does not reach a shared parameter; the
    hooks are gone after backward, also when backward raises, and the users' own hooks run."""
    torch.manual_seed(0)
    enc = nn.Linear(4, 6)
    unused = nn.Parameter(torch.randn(3, 2))               # shared, but task 1 never uses it
    conv = nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)   # non-contiguous grads
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))
    params = [*enc.parameters(), unused, *conv.parameters(), *heads.parameters()]
    x, img = torch.randn(5, 4), torch.randn(2, 2, 5, 5).to(memory_format=torch.channels_last)
    user_calls = []
    h_user = enc.weight.register_post_accumulate_grad_hook(lambda p: user_calls.append(1))

    def losses():
        f = torch.tanh(enc(x))
        c = conv(img).square().mean()
        return [heads[0](f).square().mean() + unused.sum() ** 2 + c,
                (heads[1](f) - 1).square().mean() + 2 * c]

    shared = [enc.weight, enc.bias, unused, conv.weight, conv.bias]
    opt = MTLOptimizer(torch.optim.SGD(params, lr=0.1), method="imtlg", shared=shared)
    hooks_before = [dict(p._post_accumulate_grad_hooks or {}) for p in shared]
    opt.backward(losses())
    rows = []
    for L in losses():
        gs = torch.autograd.grad(L, shared, allow_unused=True, retain_graph=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(gs, shared)]))
    torch.testing.assert_close(opt._J, torch.stack(rows), rtol=0, atol=0)
    a, b = opt._bounds[2], opt._bounds[3]
    assert torch.equal(opt._J[1, a:b], torch.zeros(b - a)) and opt._J[0, a:b].abs().sum() > 0
    assert len(user_calls) == 2                             # one per task's backward
    assert [dict(p._post_accumulate_grad_hooks or {}) for p in shared] == hooks_before

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom")

    L0, L1 = losses()
    with pytest.raises(RuntimeError, match="boom"):        # task 1's backward fails half-way
        opt.backward([L0, Boom.apply(L1)])
    assert [dict(p._post_accumulate_grad_hooks or {}) for p in shared] == hooks_before
    h_user.remove()


def test_ew_is_one_backward_unless_stats():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="ew")
    info = opt.backward(model.losses(x, ys))
    assert info.gram is None
    ref = copy.deepcopy(model)
    ref.zero_grad()
    ref.losses(x, ys).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    opt2 = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="ew", stats=True)
    info = opt2.backward(model.losses(x, ys))
    assert info.gram.shape == (3, 3) and info.layer_conflicts.shape == (4,)
    assert info.layer_gms.shape == (4,)


def test_update_every_reuses_weights_with_one_backward():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), method="nashmtl",
                       update_every=3)
    infos = []
    for _ in range(4):
        opt.zero_grad()
        infos.append(opt.backward(model.losses(x, ys)))
        g = shared_grad(model)
    assert [i.gram is not None for i in infos] == [True, False, False, True]
    torch.testing.assert_close(infos[1].weights, infos[0].weights)
    J, _ = per_task_jacobian(model, x, ys)
    torch.testing.assert_close(g, infos[3].weights @ J, rtol=1e-4, atol=1e-5)


def test_stats_accumulate_and_reset():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), method="mgda", stats=True)
    incid = []
    for _ in range(3):
        opt.zero_grad()
        info = opt.backward(model.losses(x, ys))
        incid.append(info.conflict_incidence)
        opt.step()
    s = opt.stats()
    assert s["steps"] == 3 and s["nonconverged"] == 0
    torch.testing.assert_close(s["conflict_incidence"], torch.stack(incid).mean())
    assert s["layer_conflicts"].shape == (4,) and s["weights"].shape == (3,)
    assert opt.stats()["steps"] == 0


def test_solver_failure_is_counted_and_warned():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), method="nashmtl",
                       max_iter=1, tol=1e-12)
    for _ in range(2):
        opt.zero_grad()
        info = opt.backward(model.losses(x, ys))
        assert not bool(info.converged)
    with pytest.warns(RuntimeWarning, match="did not converge on 2 of 2"):
        s = opt.stats()
    assert s["nonconverged"] == 2 and opt.nonconverged_steps == 2


def test_callable_method_and_torchjd_weighting():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    J, _ = per_task_jacobian(model, x, ys)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                       method=lambda G: torch.tensor([1.0, 2.0, 3.0]), shared=model.encoder)
    opt.backward(model.losses(x, ys))
    torch.testing.assert_close(shared_grad(model), torch.tensor([1.0, 2.0, 3.0]) @ J,
                               rtol=1e-5, atol=1e-6)
    agg = pytest.importorskip("torchjd.aggregation")
    model.zero_grad()
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method=agg.IMTLGWeighting(),
                       shared=model.encoder)
    opt.backward(model.losses(x, ys))
    w = agg.IMTLGWeighting()(J @ J.T)
    torch.testing.assert_close(shared_grad(model), w @ J, rtol=1e-4, atol=1e-5)


# --- errors -----------------------------------------------------------------------------------
def test_errors_name_the_argument():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown method 'pcgard'"):
        MTLOptimizer(sgd, method="pcgard")
    with pytest.raises(TypeError, match="takes no option"):
        MTLOptimizer(sgd, method="cagrad", leak=0.1)
    with pytest.raises(ValueError, match="update_every"):
        MTLOptimizer(sgd, method="pcgrad", update_every=2)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        MTLOptimizer(object(), method="ew")
    other = nn.Linear(2, 2)
    opt = MTLOptimizer(sgd, method="pcgrad", shared=other)
    with pytest.raises(ValueError, match="not .*parameters of the inner optimizer"):
        opt.backward(model.losses(x, ys))
    opt = MTLOptimizer(sgd, method="pcgrad")
    opt.backward(model.losses(x, ys))
    with pytest.raises(ValueError, match="got 2 losses.*T = 3"):
        opt.backward(model.losses(x, ys)[:2])
    with pytest.raises(ValueError, match="losses must be a list or a 1-D tensor"):
        opt.backward(model.losses(x, ys)[None])
    with pytest.raises(ValueError, match=r"losses\[1\] must be a scalar"):
        opt.backward([model.losses(x, ys)[0], torch.ones(2, requires_grad=True)])


# --- grouped options --------------------------------------------------------------------------
def test_distributed_options_are_one_argument_and_the_old_keywords_are_deprecated():
    model = MTLNet(T=3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    group = object()         # a stand-in: nothing is all-reduced before the first step
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        opt = MTLOptimizer(sgd, method="pcgrad", shared=model.encoder,
                           distributed=Distributed(process_group=group, sync="local", bucket_mb=1))
        assert MTLOptimizer(sgd, method="pcgrad").distributed == Distributed()
    assert opt.process_group is group and opt.sync == "local"
    assert opt._reducer.bucket_bytes == 2 ** 20
    with pytest.warns(DeprecationWarning, match=r"MTLOptimizer: process_group=, sync=, bucket_mb= "
                      r"are deprecated .*pass distributed=gradops\.optim\.Distributed\("
                      r"process_group=\.\.\., sync=\.\.\., bucket_mb=\.\.\.\) instead"):
        old = MTLOptimizer(sgd, method="pcgrad", shared=model.encoder, process_group=group,
                           sync="local", bucket_mb=1)
    assert old.distributed == opt.distributed and old.process_group is group
    assert old._reducer.bucket_bytes == 2 ** 20
    with pytest.warns(DeprecationWarning, match=r"ddp_model= is deprecated"), \
            pytest.raises(TypeError, match="ddp_model must be a DistributedDataParallel"):
        MTLOptimizer(sgd, method="pcgrad", ddp_model=model)
    with pytest.raises(ValueError, match="pass distributed= alone, not together with sync="):
        MTLOptimizer(sgd, method="pcgrad", distributed=Distributed(), sync="global")
    with pytest.raises(TypeError, match="distributed must be a gradops.optim.Distributed"):
        MTLOptimizer(sgd, method="pcgrad", distributed={"sync": "local"})
    with pytest.raises(ValueError, match="sync must be 'global' or 'local', got 'both'"):
        Distributed(sync="both")
    for bad in (0, -1.0, float("nan"), float("inf"), True, "25"):
        with pytest.raises(ValueError, match="bucket_mb must be a finite number > 0"):
            Distributed(bucket_mb=bad)


def test_the_package_calls_mtl_optimizer_without_deprecated_keywords():
    """Every MTLOptimizer(...) call in gradops/ uses distributed= (the package itself raises no
    DeprecationWarning)."""
    import ast
    import pathlib
    root = pathlib.Path(gradops.__file__).parent
    legacy = {"ddp_model", "process_group", "sync", "bucket_mb"}
    calls = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                    node.func, "attr", None)) == "MTLOptimizer":
                calls.append(path.name)
                used = legacy & {k.arg for k in node.keywords}
                assert not used, f"{path}:{node.lineno} passes {sorted(used)}"
    assert len(calls) >= 2        # engine/optimizers.py (trainer, Recon's search), benchmarks


def test_sparse_masks_shorthand_equals_an_inner_sparse_training():
    """``sparse=masks, module=`` builds the grouped form, an inner SparseTraining: same steps."""
    T = 3
    x, ys = make_data(T)
    results = []
    for grouped in (False, True):
        model = MTLNet(T=T)
        masks = {"0.weight": torch.rand(13, 7, generator=torch.Generator().manual_seed(0)) > 0.5}
        inner = torch.optim.AdamW(model.parameters(), lr=0.1)
        if grouped:
            opt = MTLOptimizer(SparseTraining(inner, masks, model.encoder), method="pcgrad",
                               shared=model.encoder, generator=torch.Generator().manual_seed(3))
        else:
            opt = MTLOptimizer(inner, method="pcgrad", shared=model.encoder, sparse=masks,
                               module=model.encoder, generator=torch.Generator().manual_seed(3))
        assert isinstance(opt.optimizer, SparseTraining)
        for _ in range(2):
            opt.zero_grad()
            opt.backward(model.losses(x, ys))
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_grad_scaler_scale_is_read_on_device_through_the_public_api():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 7)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="nashmtl",
                       grad_scaler=scaler)
    opt.backward(scaler.scale(model.losses(x, ys)))
    s = opt._scale()
    assert s.shape == () and s.dtype == torch.float32 and s.device == x.device
    assert s.item() == 2.0 ** 7
    assert MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                        grad_scaler=torch.amp.GradScaler("cpu", enabled=False))._scale() is None


# --- the Optimizer contract -------------------------------------------------------------------
def test_is_a_real_optimizer_with_scheduler_and_clipping():
    model = MTLNet(T=3)
    x, ys = make_data(3)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = MTLOptimizer(inner, method="pcgrad")
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        norm = nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        assert norm > 0.01
        total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
        assert total <= 0.01 * (1 + 1e-4)
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == 0.25


def _train(model, opt, x, ys, steps):
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()


@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "graddrop", "nashmtl"])
def test_state_dict_resume_equals_uninterrupted_run(method):
    x, ys = make_data(3)
    torch.manual_seed(0)
    a = MTLNet(T=3)
    opt_a = MTLOptimizer(torch.optim.Adam(a.parameters(), lr=1e-2), method=method)
    _train(a, opt_a, x, ys, 6)

    torch.manual_seed(0)
    b = MTLNet(T=3)
    opt_b = MTLOptimizer(torch.optim.Adam(b.parameters(), lr=1e-2), method=method)
    _train(b, opt_b, x, ys, 3)
    model_sd, opt_sd = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    assert "mtl" in opt_sd and "state" in opt_sd
    torch.manual_seed(123)   # a different global RNG: the state dict alone must carry the state
    c = MTLNet(T=3, seed=9)
    c.load_state_dict(model_sd)
    opt_c = MTLOptimizer(torch.optim.Adam(c.parameters(), lr=1e-2), method=method)
    opt_c.load_state_dict(opt_sd)
    _train(c, opt_c, x, ys, 3)
    for p, q in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_loads_an_inner_only_state_dict():
    x, ys = make_data(3)
    model = MTLNet(T=3)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.losses(x, ys).sum().backward()
    inner.step()
    opt = MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), method="cagrad")
    opt.load_state_dict(inner.state_dict())
    assert opt.state_dict()["state"][0]["step"] == 1
    _train(model, opt, x, ys, 1)
    with pytest.raises(ValueError, match="state of method 'cagrad'"):
        MTLOptimizer(torch.optim.Adam(model.parameters()), method="imtlg").load_state_dict(
            opt.state_dict())


# --- AMP ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["pcgrad", "graddrop", "mgda", "cagrad", "imtlg", "nashmtl",
                                    "alignedmtl", "gradvac"])
def test_grad_scaler_gives_the_unscaled_update(method):
    """Scaled losses in, unscale_ -> the same combined gradient as without scaling (Nash-MTL is
    not scale-invariant: the optimizer hands it the unscaled Gram via grad_scaler=)."""
    x, ys = make_data(3)
    grads = []
    for use_scaler in (False, True):
        model = MTLNet(T=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None
        opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                           grad_scaler=scaler, generator=torch.Generator().manual_seed(5))
        L = model.losses(x, ys)
        if scaler is None:
            opt.backward(L)
        else:
            opt.backward(scaler.scale(L))
            scaler.unscale_(opt)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_overflow_skips_the_step_and_nonfinite_propagates():
    x, ys = make_data(3)
    model = MTLNet(T=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="nashmtl",
                       grad_scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    L = model.losses(x, ys)
    L = torch.stack([L[0], L[1] * float("inf"), L[2]])
    opt.backward(scaler.scale(L))
    assert not torch.isfinite(shared_grad(model)).all()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0 ** 10
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    # the next, finite step works and the Nash state was not poisoned
    opt.zero_grad()
    opt.backward(scaler.scale(model.losses(x, ys)))
    scaler.step(opt)
    assert torch.isfinite(opt._weights).all()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_autocast_bf16_training_runs():
    x, ys = make_data(3)
    model = MTLNet(T=3)
    opt = MTLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), method="pcgrad")
    first = None
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            L = model.losses(x, ys)
        opt.backward(L.float())
        opt.step()
        first = first if first is not None else L.detach().float().sum()
    assert L.detach().float().sum() < first


# --- sparse training --------------------------------------------------------------------------
def test_sparse_masks_per_task_gradients_and_keeps_frozen_entries():
    x, ys = make_data(3)
    model = MTLNet(T=3)
    masks = {p: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.4
             for i, p in enumerate(model.encoder.parameters()) if p.dim() == 2}
    init = {p: p.detach().clone() for p in masks}
    opt = MTLOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
                       method="pcgrad", sparse=masks, shared=model.encoder)
    J, _ = per_task_jacobian(model, x, ys)
    keep = torch.cat([masks.get(p, torch.ones_like(p, dtype=torch.bool)).reshape(-1)
                      for p in model.encoder.parameters()])
    info = opt.backward(model.losses(x, ys))
    Jm = J * keep
    torch.testing.assert_close(info.gram, Jm @ Jm.T, rtol=1e-4, atol=1e-6)
    opt.step()
    _train(model, opt, x, ys, 30)
    for p, m in masks.items():
        assert torch.equal(p[~m], init[p][~m])
        assert not torch.equal(p[m], init[p][m])


# --- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS)
def test_training_reduces_the_losses(method):
    x, ys = make_data(3, n=64)
    model = MTLNet(T=3)
    opt = MTLOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), method=method)
    start = model.losses(x, ys).detach()
    _train(model, opt, x, ys, 300)
    end = model.losses(x, ys).detach()
    assert torch.isfinite(end).all()
    assert end.sum() < 0.7 * start.sum(), (start, end)
    assert opt.stats()["nonconverged"] == 0


def test_mixed_loss_tensor_needs_explicit_shared():
    """A 1-D loss tensor whose graph mixes the tasks (here: learned loss weights) cannot be split
    per task: shared='auto' is refused with a clear error; explicit shared works and is right."""
    x, ys = make_data(3)
    model = MTLNet(T=3)
    lw = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="shared='auto' needs the losses"):
        MTLOptimizer(torch.optim.SGD([*model.parameters(), lw], lr=0.1), method="pcgrad"
                     ).backward(model.losses(x, ys) * lw)
    opt = MTLOptimizer(torch.optim.SGD([*model.parameters(), lw], lr=0.1), method="imtlg",
                       shared=model.encoder)
    info = opt.backward(model.losses(x, ys) * lw)
    J, _ = per_task_jacobian(model, x, ys)
    torch.testing.assert_close(info.gram, J @ J.T, rtol=1e-4, atol=1e-5)
    assert lw.grad is not None and torch.isfinite(lw.grad).all()


# --- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("method", ALL_METHODS)
def test_gpu_backward_has_no_host_sync(method):
    """After the first step (layout set-up), backward runs without a host synchronisation."""
    x, ys = make_data(3)
    x, ys = x.cuda(), [y.cuda() for y in ys]
    model = MTLNet(T=3).cuda()
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), method=method, stats=True)
    opt.backward(model.losses(x, ys))
    opt.step()
    L = model.losses(x, ys)
    torch.cuda.synchronize()
    opt.zero_grad()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.backward(L)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(shared_grad(model)).all()


@pytest.mark.skipif(gradops._backend._C is None, reason="the C++ extension was not built")
def test_stream_copy_is_an_exact_copy_at_every_size_and_alignment():
    """The extension's non-temporal copy (MTLOptimizer's per-task rows of J on CPU): small copies
    (memcpy), large ones (streamed body + unaligned head and tail), any dtype, bit for bit, and
    only the destination's bytes are written."""
    C = gradops._backend._C
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 1000, 65_536, 65_537, 300_001, 1 << 20):
        for off in (0, 1, 3):
            for dt in (torch.float32, torch.bfloat16):
                src = torch.randn(n + 5, generator=g).to(dt)[off:off + n]
                buf = torch.full((n + 8,), -7.0, dtype=dt)
                dst = buf[off:off + n]
                C.stream_copy_cpu(dst, src)
                assert torch.equal(dst.view(torch.int16 if dt == torch.bfloat16 else torch.int32),
                                   src.view(torch.int16 if dt == torch.bfloat16 else torch.int32))
                assert (buf[:off] == -7).all() and (buf[off + n:] == -7).all()
    with pytest.raises(RuntimeError, match="one dtype and size"):
        C.stream_copy_cpu(torch.zeros(4), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="one dtype and size"):
        C.stream_copy_cpu(torch.zeros(4), torch.zeros(8)[::2])


# --- float64 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("linear_gram", ["off", "on"])
@pytest.mark.parametrize("method", ["pcgrad", "mgda", "imtlg", "graddrop", "gradvac"])
def test_float64_model_keeps_float64_throughout(method, linear_gram):
    """A float64 model: J, the Grams, the weights and the combined gradient are float64 and match
    the method on the float64 reference Jacobian far below float32 rounding."""
    T = 3
    model = MTLNet(T=T).double()
    x, ys = make_data(T, n=5)
    x, ys = x.double(), [y.double() for y in ys]
    J, _ = per_task_jacobian(model, x, ys)
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method=method,
                       shared=model.encoder, linear_gram=linear_gram, stats=True)
    gen = torch.Generator().set_state(opt._generator.get_state())
    info = opt.backward(model.losses(x, ys))
    g = shared_grad(model)
    assert g.dtype == torch.float64 and info.gram.dtype == torch.float64
    assert info.layer_gram.dtype == torch.float64
    if opt._J is not None:
        assert opt._J.dtype == torch.float64
    torch.testing.assert_close(info.gram, J @ J.T, rtol=1e-10, atol=1e-12)
    if method == "pcgrad":
        ref = pcgrad_reference(J, random_orders(T, generator=gen))
    elif method == "graddrop":
        seed = int(_draw_seed(gen, torch.device("cpu")))
        noise = philox_uniform_reference(seed, torch.arange(J.shape[1])).double()
        ref, _ = graddrop_reference(J, torch.zeros(T, dtype=torch.float64), noise)
    elif method == "gradvac":
        ref, _ = gradvac_reference(J, opt._offsets_cpu, random_orders(T, generator=gen),
                                   torch.zeros(opt.L, T, T, dtype=torch.float64), 0.5)
    else:
        assert info.weights.dtype == torch.float64
        ref = info.weights @ J
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-11)
    opt.step()
