"""The method registry, and the checks every registered method passes (a new method's module is
picked up here without editing this file): its declaration, its options, the property checks of
``tests/_asserts.py`` for Gram-weighted methods, one MTLOptimizer step and a bit-exact resume."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

import gradops.weighting as W
from gradops.optim import MTLOptimizer
from gradops.weighting import (KINDS, GramMethod, LossMethod, Method, Options, StepContext,
                               all_methods, create_method, get_method, method_names)

from _asserts import (OpCase, Out, assert_nonfinite_propagates, assert_permutation_equivariant,
                      assert_scaling, assert_structure)

ALL = all_methods()
OPTIMIZER_METHODS = [m for m in ALL if m.kind != "trainer"]
GRAM = [m for m in ALL if m.kind == "gram"]


def _ids(classes):
    return [c.name for c in classes]


# --- the registry itself ----------------------------------------------------------------------
def test_names_are_unique_canonical_and_found_in_any_spelling():
    names = method_names()
    assert len(names) == len(set(names))
    for cls in ALL:
        assert cls.name == cls.name.lower() and "_" not in cls.name
        assert get_method(cls.name.upper().replace("-", "_")) is cls
        assert cls.kind in KINDS and cls.display and cls.paper
    assert get_method("IMTL-G").name == "imtlg" and get_method("pcgrad_layer").name == \
        "pcgrad-layer"


def test_listing_order_groups_the_kinds():
    kinds = [c.kind for c in ALL]
    assert kinds == sorted(kinds, key=KINDS.index)
    assert method_names("loss")[:3] == ("uw", "dwa", "famo")


def test_unknown_names_and_kinds_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'; valid: ew, "):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown method kind"):
        method_names("weird")
    with pytest.raises(TypeError, match="a method name must be a str"):
        get_method(3)


def test_register_checks_the_declaration():
    class Bad(GramMethod):
        name = "Bad_Name"
        display = "x"
        paper = "y"
    with pytest.raises(ValueError, match="lower case"):
        W.register(Bad)

    class NoPaper(GramMethod):
        name = "no-paper"
        display = "x"
    with pytest.raises(ValueError, match="paper is empty"):
        W.register(NoPaper)
    with pytest.raises(ValueError, match="already registered"):
        W.register(type("CAGrad", (GramMethod,), {"name": "cagrad", "display": "x",
                                                   "paper": "y"}))
    assert "no-paper" not in method_names()


# --- declarations and options of every method -------------------------------------------------
@pytest.mark.parametrize("cls", ALL, ids=_ids(ALL))
def test_declaration_and_default_options(cls):
    assert issubclass(cls.Options, Options) and dataclasses.is_dataclass(cls.Options)
    m = cls()                                   # every option has a default
    d = cls.describe()
    assert d["name"] == cls.name and set(d["options"]) == {f.name for f in
                                                         dataclasses.fields(cls.Options)}
    assert repr(m).startswith(type(m).__name__ + "(")
    with pytest.raises(TypeError, match=f"method {cls.name!r} takes no option"):
        cls(not_an_option=1)


@pytest.mark.parametrize("name", sorted(W.METHODS))
def test_options_default_to_the_functions_defaults(name):
    """A method with a plain function G -> w declares the function's keyword defaults."""
    params = inspect.signature(W.METHODS[name]).parameters
    for f in dataclasses.fields(get_method(name).Options):
        assert params[f.name].default == f.default, f"{name}.{f.name}"


@pytest.mark.parametrize("cls", [c for c in ALL if dataclasses.fields(c.Options)],
                         ids=_ids([c for c in ALL if dataclasses.fields(c.Options)]))
def test_option_types_are_checked(cls):
    f = dataclasses.fields(cls.Options)[0]
    hint = type(f.default)
    if hint in (int, float, bool, str):
        bad = [] if hint is str else "text"
        with pytest.raises(ValueError, match=f"option {f.name!r}"):
            cls(**{f.name: bad})


def test_create_method_takes_names_objects_and_option_objects():
    m = create_method("CAGrad", {"c": 0.2})
    assert m.options.c == 0.2
    assert create_method(m) is m
    o = get_method("cagrad").Options(c=0.3)
    assert create_method("cagrad", o).options is o
    with pytest.raises(ValueError, match="options given with a method object"):
        create_method(m, {"c": 0.1})
    with pytest.raises(ValueError, match="'c' must be >= 0"):
        create_method("cagrad", {"c": -1.0})


def test_parse_option_value_reads_by_type():
    cag, pcg = get_method("cagrad"), get_method("pcgrad")
    assert W.parse_option_value(cag, "c", "0.5") == 0.5
    assert W.parse_option_value(cag, "smooth", "none") is None
    assert W.parse_option_value(pcg, "libmtl_self_visit", "true") is True
    assert W.parse_option_value(get_method("graddrop"), "leak", "0.1/0.2") == (0.1, 0.2)
    with pytest.raises(ValueError, match="has no option 'x'"):
        W.parse_option_value(cag, "x", "1")
    with pytest.raises(ValueError, match="cannot read 'abc'"):
        W.parse_option_value(cag, "max_iter", "abc")


# --- Gram-weighted methods: the shared property checks ----------------------------------------
def _gram_case(cls) -> OpCase:
    """``J -> (w, d)`` with ``w`` from the method on ``G = J J^T`` and ``d = w^T J``: a fresh
    method object per problem (a method with state, e.g. MoDo's weights, starts anew)."""

    def fn(J, pi):
        m = cls()
        G = J.double() @ J.double().T
        w, _ = m.weights(G, StepContext(generator=torch.Generator().manual_seed(0),
                                        losses=torch.ones(J.shape[0], dtype=torch.float64),
                                        dtype=torch.float64))
        return w, w.to(J.dtype) @ J
    outs = (Out("w", lambda T, P: (T,), dtype=torch.float64, task_dims=(0,),
                nonfinite_at=lambda i, k, T, P: (slice(None),),
                needs_full_rank=True),
            Out("d", lambda T, P: (P,), dtype=None, degree=1, odd=True,
                nonfinite_at=lambda i, k, T, P: (k,), needs_full_rank=True))
    return OpCase(cls.name, fn, outs, rtol=1e-4, atol=1e-5, positive_scales_only=True)


def _J(T: int, P: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cls", GRAM, ids=_ids(GRAM))
@pytest.mark.parametrize("T", [2, 5])
def test_gram_method_structure_and_nonfinite(cls, T):
    case = _gram_case(cls)
    assert_structure(case, _J(T))
    assert_nonfinite_propagates(case, _J(T))


EQUIVARIANT = [c for c in GRAM if not c.random and c.permutation_equivariant]


@pytest.mark.parametrize("cls", EQUIVARIANT, ids=_ids(EQUIVARIANT))
def test_gram_method_permutation_equivariant(cls):
    assert_permutation_equivariant(_gram_case(cls), _J(5))


@pytest.mark.parametrize("cls", [c for c in GRAM if c.scale_invariant],
                         ids=_ids([c for c in GRAM if c.scale_invariant]))
def test_scale_invariant_methods_keep_their_weights(cls):
    """``scale_invariant``: w unchanged under J -> sJ, so d -> s d (what AMP relies on)."""
    assert_scaling(_gram_case(cls), _J(4), 3.0)


# --- every optimizer method runs in MTLOptimizer and resumes bit-exactly ----------------------
class _Net(nn.Module):
    def __init__(self, T: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(T)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def losses(self, x, y):
        h = self.encoder(x)
        return [((head(h).squeeze(-1) - y[:, t]) ** 2).mean() for t, head in
                enumerate(self.heads)]


def _train(cls, steps: int, state=None, T: int = 3):
    torch.manual_seed(0)
    net = _Net(T)
    opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), method=cls.name,
                       shared=net.encoder, num_tasks=T, linear_gram="off")
    if state is not None:
        net.load_state_dict(state[0])
        opt.load_state_dict(state[1])
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 5, generator=g), torch.randn(16, T, generator=g))
               for _ in range(4)]
    start = 0 if state is None else state[2]
    for i in range(start, start + steps):
        x, y = batches[i % 4]
        opt.zero_grad()
        opt.backward(net.losses(x, y))
        opt.step((lambda x=x, y=y: net.losses(x, y)) if isinstance(opt.method, LossMethod)
                 else None)
        if i % 2 == 1:
            opt.end_epoch()
    return net, opt, start + steps


@pytest.mark.parametrize("cls", OPTIMIZER_METHODS, ids=_ids(OPTIMIZER_METHODS))
def test_mtloptimizer_runs_every_method_and_resumes_bit_exactly(cls):
    net, opt, _ = _train(cls, 4)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    first, opt_first, _ = _train(cls, 2)
    resumed, _, _ = _train(cls, 2, (first.state_dict(), opt_first.state_dict(), 2))
    for (k, p), q in zip(net.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), f"{cls.name}: {k} differs after a resume"


def _scaler_run(cls, use_scaler: bool, T: int = 3) -> list[torch.Tensor]:
    """Four steps of ``cls`` (an epoch boundary after the second), with AMP's GradScaler or
    without; the gradients of every parameter after ``unscale_``."""
    torch.manual_seed(0)
    net = _Net(T)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if use_scaler else None
    opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.05), method=cls.name,
                       shared=net.encoder, num_tasks=T, grad_scaler=scaler, linear_gram="off",
                       generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    seen = []
    for step in range(4):
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, T, generator=g)
        losses = net.losses(x, y)
        closure = (lambda x=x, y=y: net.losses(x, y)) \
            if isinstance(opt.method, LossMethod) and opt.method.needs_closure else None
        opt.zero_grad()
        if scaler is None:
            opt.backward(losses)
        else:
            opt.backward(scaler.scale(torch.stack(losses)))
            scaler.unscale_(opt)
        seen.append(torch.cat([p.grad.reshape(-1) for grp in opt.param_groups
                               for p in grp["params"] if p.grad is not None]))
        args = () if closure is None else (closure,)
        if scaler is None:
            opt.step(*args)
        else:
            scaler.step(opt, *args)
            scaler.update()
        if step == 1:
            opt.end_epoch()
    return seen


@pytest.mark.parametrize("cls", OPTIMIZER_METHODS, ids=_ids(OPTIMIZER_METHODS))
def test_grad_scaler_gives_the_unscaled_gradients(cls):
    """AMP: scaled losses in, ``unscale_`` -> the gradients of an unscaled run, step after step
    (the method's own parameters included): a method that is not scale-invariant gets the
    unscaled Gram, a loss-level method scales what it adds to the losses."""
    for a, b in zip(_scaler_run(cls, False), _scaler_run(cls, True)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_trainer_modes_are_refused_by_mtloptimizer():
    net = _Net(2)
    with pytest.raises(ValueError, match="mode of the bundled trainer"):
        MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="stl")


def test_method_objects_and_method_options_configure_the_optimizer():
    net = _Net(2)
    opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method=W.CAGrad(c=0.7),
                       shared=net.encoder)
    assert opt.method.options.c == 0.7
    opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="cagrad",
                       method_options={"c": 0.6}, shared=net.encoder)
    assert opt.method.options.c == 0.6
    with pytest.warns(DeprecationWarning, match="method_options"):
        opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="cagrad", c=0.5,
                           shared=net.encoder)
    assert opt.method.options.c == 0.5
    with pytest.warns(DeprecationWarning, match="pcgrad-layer"):
        opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="pcgrad",
                           per_layer=True, shared=net.encoder)
    assert opt.method.name == "pcgrad-layer"
    with pytest.raises(TypeError, match="takes no option"):
        MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="ew",
                     method_options={"c": 1.0})


def test_every_registered_class_is_a_method():
    assert all(issubclass(c, Method) for c in ALL)
