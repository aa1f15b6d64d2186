"""ExcessMTL (He et al., ICML 2024): exponentiated-gradient weights on AdaGrad excess-risk
estimates, checked step by step against TorchJD's ExcessMTLWeighting (stateful, as here)."""
import math

import pytest
import torch
from torch import nn

import gradops.weighting as W
from gradops.optim import MTLOptimizer
from gradops.weighting import StepContext, get_method

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

J3 = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
CTX = StepContext(dtype=torch.float64)


def _Js(T, P, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, P, generator=g, dtype=torch.float64) * (1 + k) for k in range(n)]


def test_declaration_and_option_errors():
    cls = get_method("ExcessMTL")
    assert cls is W.ExcessMTL and cls.kind == "elementwise" and not cls.scale_invariant
    with pytest.raises(ValueError, match="'robust_step_size' must be > 0"):
        cls(robust_step_size=0.0)
    with pytest.raises(ValueError, match="'n_warmup_steps' must be >= 0"):
        cls(n_warmup_steps=-1)
    with pytest.raises(ValueError, match="'n_warmup_steps' must be int"):
        cls(n_warmup_steps=1.5)
    m = cls()
    m.step_weights(J3)
    with pytest.raises(ValueError, match=r"state is for J of shape \(3, 3\)"):
        m.step_weights(torch.ones(2, 3, dtype=torch.float64))


def test_pinned_values():
    """Computed once by this implementation after it agreed with TorchJD (below)."""
    m = W.ExcessMTL(robust_step_size=0.5)
    torch.testing.assert_close(m.step_weights(J3), torch.tensor(
        [1.2576868845, 0.9794874693, 0.7628256462], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(m.step_weights(2 * J3), torch.tensor(
        [1.2576868698, 0.9794874906, 0.7628256396], dtype=torch.float64), atol=1e-9, rtol=0)
    d = m.combine(J3, CTX)
    torch.testing.assert_close(d, torch.tensor([1.7474306141, 0.2166618575, 2.2987118750],
                                               dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(d, m.loss_weights() @ J3)
    assert float(m.loss_weights().sum()) == pytest.approx(3.0)


@pytest.mark.parametrize("opts", [{"robust_step_size": 1.0}, {"robust_step_size": 1e-2},
                                  {"robust_step_size": 0.5, "n_warmup_steps": 3}])
def test_agrees_with_torchjd_over_steps(opts):
    """TorchJD 0.18's ExcessMTLWeighting on the same J's, 8 steps of growing scale: our
    weights are T times its (LibMTL's sum-T scale)."""
    m = W.ExcessMTL(**opts)
    ref = m.torchjd(3).weighting
    for J in _Js(3, 20, 8, seed=0):
        torch.testing.assert_close(m.step_weights(J) / 3, ref(J), rtol=0, atol=1e-14)
    Jf = _Js(3, 20, 1, seed=1)[0]
    torch.testing.assert_close(m.step_weights(Jf.float()).double() / 3, ref(Jf), rtol=1e-5,
                               atol=1e-6)


def test_amp_scale_is_divided_out_of_the_statistics():
    a, b = W.ExcessMTL(robust_step_size=0.5), W.ExcessMTL(robust_step_size=0.5)
    for J in _Js(3, 6, 3, seed=2):
        s = torch.tensor(1024.0, dtype=torch.float64)
        torch.testing.assert_close(a.step_weights(J), b.step_weights(J * s, s), rtol=1e-12,
                                   atol=0)


def test_nonfinite_step_propagates_and_leaves_the_state():
    m = W.ExcessMTL(robust_step_size=0.5)
    J = _Js(3, 6, 1, seed=3)[0]
    m.step_weights(J)
    saved = m.state_dict()
    bad = J.clone()
    bad[2, 3] = math.inf
    d = m.combine(bad, CTX)
    assert not torch.isfinite(d).all()
    after = m.state_dict()
    assert after.pop("excessmtl_steps") == saved.pop("excessmtl_steps") + 1   # calls, as TorchJD
    for k, v in saved.items():
        assert torch.equal(after[k], v), k
    n = W.ExcessMTL(robust_step_size=0.5)
    n.load_state_dict(m.state_dict())
    assert torch.equal(n.combine(J, CTX), m.combine(J, CTX))


def test_mtloptimizer_step_is_the_weighted_sum():
    torch.manual_seed(0)
    enc, heads = nn.Linear(4, 3), nn.ModuleList([nn.Linear(3, 1) for _ in range(2)])
    params = list(enc.parameters()) + list(heads.parameters())
    opt = MTLOptimizer(torch.optim.SGD(params, lr=0.1), method="excessmtl",
                       method_options={"robust_step_size": 1.0}, shared=enc, num_tasks=2)
    ref = torchjd_aggregation.ExcessMTLWeighting(robust_step_size=1.0)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for _ in range(3):
        losses = [((heads[t](enc(x)).squeeze(-1) - y[:, t]) ** 2).mean() for t in range(2)]
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(L, list(enc.parameters()),
                                                                   retain_graph=True)])
                for L in losses]
        J = torch.stack(rows)
        expect = 2 * ref(J.double()).float() @ J
        opt.zero_grad()
        opt.backward(losses)
        got = torch.cat([enc.weight.grad.flatten(), enc.bias.grad.flatten()])
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_column_blocks_match_one_block_and_torchjd(monkeypatch, dtype):
    """On CPU the pass over ``J`` runs in column blocks (64 columns here: 5 blocks, the last
    partial): ``S`` is bit-identical to one block's (the same elementwise ops), the weights
    differ only by the order ``r``'s row sums are added in, and still agree with TorchJD;
    an AMP scale and a non-finite step (which leaves the state) included."""
    import gradops.weighting._excessmtl as mod

    Js = [J.to(dtype) for J in _Js(3, 300, 5, seed=4)]
    Js[3] = Js[3].clone()
    Js[3][1, 250] = math.nan                             # in the last, partial block
    s = torch.tensor(256.0, dtype=dtype)
    one, blocked = W.ExcessMTL(robust_step_size=0.5), W.ExcessMTL(robust_step_size=0.5)
    ref = one.torchjd(3).weighting
    tol = {"rtol": 1e-12, "atol": 0} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 0}
    ref_tol = tol if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}   # as above
    for k, J in enumerate(Js):
        monkeypatch.setattr(mod, "_CPU_BLOCK", 1 << 30)
        w1 = one.step_weights(J * s, s) if k == 2 else one.step_weights(J)
        monkeypatch.setattr(mod, "_CPU_BLOCK", 1)
        assert mod._block_width(3, 300) == 64
        wb = blocked.step_weights(J * s, s) if k == 2 else blocked.step_weights(J)
        assert torch.equal(blocked.sq_grad_sum, one.sq_grad_sum)
        if k == 3:
            assert not torch.isfinite(wb).any() and not torch.isfinite(w1).any()
            continue
        torch.testing.assert_close(wb, w1, **tol)
        torch.testing.assert_close(wb.double() / 3, ref(J.double()), **ref_tol)
    torch.testing.assert_close(blocked.lam, one.lam, **tol)


def test_overflowing_squares_count_as_nonfinite():
    """A finite float32 ``J`` whose square overflows (``|J| > 1.8e19``) makes a non-finite step
    (found from ``max |J|``, without a pass writing ``J^2``) and leaves the state."""
    m = W.ExcessMTL()
    J = _Js(3, 6, 1, seed=5)[0].float()
    m.step_weights(J)
    saved = m.state_dict()
    big = J.clone()
    big[0, 2] = 3e19
    assert torch.isfinite(big).all()
    assert not torch.isfinite(m.step_weights(big)).any()
    after = m.state_dict()
    for k in ("excessmtl_sq_grad_sum", "excessmtl_lambda", "excessmtl_base"):
        assert torch.equal(after[k], saved[k]), k
    # as before, the square is taken before AMP's unscaling: it overflows all the same
    assert not torch.isfinite(m.step_weights(big, torch.tensor(1e10))).any()
    assert torch.equal(m.state_dict()["excessmtl_sq_grad_sum"], saved["excessmtl_sq_grad_sum"])
