"""RGW (Lin et al., TMLR 2022, Algorithm 2): random gradient weights, checked against TorchJD's
``Random`` aggregator (the same method) and the paper's formula."""
import pytest
import torch
from torchjd.aggregation import Random, RandomWeighting

from gradops.optim import MTLOptimizer
from gradops.weighting import RGW, StepContext, get_method
from loss_helpers import TwoTask, batch

J3 = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, -1.0, 3.0, 0.5], [2.0, 0.0, 1.0, 1.0]])


def _ctx(seed: int, dtype=torch.float32) -> StepContext:
    return StepContext(generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_declaration_and_options():
    assert get_method("RGW") is RGW and RGW.kind == "gram" and RGW.random
    assert RGW.scale_invariant and not RGW.iterative
    with pytest.raises(ValueError, match="method 'rgw': option 'distribution' must be one of"):
        RGW(distribution="dirichlet")


@pytest.mark.parametrize("seed", [0, 1, 5])
@pytest.mark.parametrize("T", [2, 3, 7])
def test_agrees_with_torchjds_random_aggregator(seed, T):
    """TorchJD: ``softmax(randn(m))`` from the global generator, applied to J's rows; with the
    same seed and a float32 matrix it draws what the optimizer's generator draws."""
    J = torch.randn(T, 6, generator=torch.Generator().manual_seed(10 + T))
    w, status = RGW().weights(J @ J.T, _ctx(seed))
    assert status is None
    torch.manual_seed(seed)
    expect = Random()(J)
    torch.manual_seed(seed)
    expect_w = RandomWeighting()(J)
    torch.testing.assert_close(w, expect_w, rtol=0, atol=1e-7)
    torch.testing.assert_close(w @ J, expect, rtol=0, atol=1e-6)


def test_pinned_values_and_the_uniform_variant():
    """Pinned on seed 0 (computed once by this implementation after it agreed with TorchJD)."""
    G = torch.eye(3, dtype=torch.float64)
    w, _ = RGW().weights(G, _ctx(0, torch.float64))
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor([0.844634, 0.134893, 0.020473],
                                               dtype=torch.float64), atol=1e-6, rtol=0)
    wu, _ = RGW(distribution="uniform").weights(G, _ctx(0, torch.float64))
    expect = torch.softmax(torch.rand(3, generator=torch.Generator().manual_seed(0)), dim=0)
    torch.testing.assert_close(wu, expect.double())
    assert float(wu.sum()) == pytest.approx(1.0)


def test_weights_ignore_the_gram_but_not_its_nans():
    w1, _ = RGW().weights(J3 @ J3.T, _ctx(3))
    w2, _ = RGW().weights(5 * torch.eye(3), _ctx(3))
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    G = J3 @ J3.T
    G[0, 1] = float("nan")
    w, _ = RGW().weights(G, _ctx(3))
    assert torch.isnan(w).all()


def test_mtloptimizer_step_is_the_random_combination_with_fresh_weights_each_step():
    model = TwoTask()
    opt = MTLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method="rgw",
                       shared=model.encoder, generator=torch.Generator().manual_seed(3),
                       linear_gram="off")
    x, y = batch()
    draws = torch.Generator().manual_seed(3)
    seen = []
    for _ in range(2):
        losses = model.losses(x, y)
        w = torch.softmax(torch.randn(2, generator=draws), dim=0)
        ref = torch.autograd.grad(sum(w[t] * losses[t] for t in range(2)),
                                  model.encoder.weight, retain_graph=True)[0]
        opt.zero_grad()
        info = opt.backward(losses)
        torch.testing.assert_close(model.encoder.weight.grad, ref)
        seen.append(info.weights.clone())
        opt.step()
    assert not torch.equal(seen[0], seen[1])
