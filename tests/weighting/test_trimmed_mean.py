"""TrimmedMean (TorchJD's aggregator; Yin et al., ICML 2018, coordinate-wise trimmed mean):
checked against TorchJD's ``TrimmedMean`` and hand-computed values."""
import pytest
import torch
from torchjd.aggregation import TrimmedMean as TorchJDTrimmedMean

from gradops.optim import MTLOptimizer
from gradops.weighting import StepContext, TrimmedMean, get_method
from gradops.weighting._trimmed_mean import trimmed_mean
from test_registry import _Net

# columns: an outlier on each side, all zeros, ties, a large negative outlier
J5 = torch.tensor([[3.0, 0.0, -4.0, 1.0],
                   [-1.0, 0.0, 1.0, 2.0],
                   [0.5, 0.0, 1.0, 3.0],
                   [10.0, 0.0, 1.0, 4.0],
                   [2.0, 0.0, 7.0, -100.0]])


def test_declaration_and_options():
    assert get_method("TrimmedMean") is TrimmedMean and TrimmedMean.kind == "elementwise"
    assert get_method("trimmed_mean") is TrimmedMean and not TrimmedMean.random
    assert TrimmedMean().options.trim_number == 1
    with pytest.raises(ValueError, match="option 'trim_number' must be >= 0"):
        TrimmedMean(trim_number=-1)
    with pytest.raises(ValueError, match="option 'trim_number' must be int"):
        TrimmedMean(trim_number=1.5)
    with pytest.raises(ValueError, match=r"'trim_number' = 2 needs at least .* = 5 tasks, got "
                       r"T = 4"):
        TrimmedMean(trim_number=2).combine(J5[:4], StepContext())


def test_pinned_hand_computed_values():
    """Sorted columns: (-1, .5, 2, 3, 10), zeros, (-4, 1, 1, 1, 7), (-100, 1, 2, 3, 4)."""
    ctx = StepContext()
    torch.testing.assert_close(TrimmedMean(trim_number=1).combine(J5, ctx),
                               torch.tensor([5.5 / 3, 0.0, 1.0, 2.0]))
    torch.testing.assert_close(TrimmedMean(trim_number=2).combine(J5, ctx),
                               torch.tensor([2.0, 0.0, 1.0, 2.0]))
    torch.testing.assert_close(TrimmedMean(trim_number=0).combine(J5, ctx),
                               torch.tensor([2.9, 0.0, 1.2, -18.0]))


@pytest.mark.parametrize("T,b", [(1, 0), (3, 0), (3, 1), (5, 2), (8, 1), (8, 3), (40, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_agrees_with_torchjds_trimmed_mean(T, b, dtype):
    g = torch.Generator().manual_seed(T * 10 + b)
    J = torch.randn(T, 257, generator=g, dtype=dtype)
    J[:, :20] = torch.randint(-2, 3, (T, 20), generator=g).to(dtype)     # ties
    out = TrimmedMean(trim_number=b).combine(J, StepContext())
    expect = TorchJDTrimmedMean(trim_number=b)(J)
    assert out.dtype == dtype and out.shape == (257,)
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-6 if dtype == torch.float32
                               else 1e-14)
    assert TrimmedMean(trim_number=b).torchjd(T).trim_number == b


def test_permuting_the_tasks_changes_nothing_and_scaling_scales():
    perm = torch.tensor([3, 0, 4, 2, 1])
    for b in (1, 2):
        out = trimmed_mean(J5, b)
        assert torch.equal(trimmed_mean(J5[perm], b), out)
        torch.testing.assert_close(trimmed_mean(2.5 * J5, b), 2.5 * out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("b", [0, 1, 2])
def test_nonfinite_values_propagate_even_where_trimming_would_drop_them(bad, b):
    J = J5.clone()
    J[3, 2] = bad
    out = trimmed_mean(J, b)
    assert not torch.isfinite(out[2])
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(out[keep], trimmed_mean(J5, b)[keep], rtol=0, atol=0)


def test_mtloptimizer_step_is_the_trimmed_mean_of_the_task_gradients():
    net = _Net(3)
    opt = MTLOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method="trimmed-mean",
                       shared=net.encoder, linear_gram="off")
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
    losses = net.losses(x, y)
    params = list(net.encoder.parameters())
    rows = [torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(L, params,
                                                                     retain_graph=True)])
            for L in losses]
    expect = TorchJDTrimmedMean(trim_number=1)(torch.stack(rows))
    opt.zero_grad()
    opt.backward(losses)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, expect)
