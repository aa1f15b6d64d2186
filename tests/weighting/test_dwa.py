"""DWA (Liu et al., CVPR 2019) as a loss-level method of the registry."""
import pytest
import torch

from gradops.weighting import DWA, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


def test_declaration_and_options():
    assert get_method("dwa") is DWA and DWA.kind == "loss"
    with pytest.raises(ValueError, match="'temperature' must be > 0"):
        DWA(temperature=0.0)


def test_weights_from_the_last_two_epochs():
    dwa = setup_method("dwa", 2, temperature=2.0)
    assert dwa.loss_weights().tolist() == [1.0, 1.0]
    dwa.end_epoch(torch.tensor([1.0, 2.0]))
    assert dwa.loss_weights().tolist() == [1.0, 1.0]         # still w = 1 after one epoch
    dwa.end_epoch(torch.tensor([0.5, 1.8]))
    r = torch.tensor([0.5, 0.9]) / 2.0
    expect = 2 * torch.exp(r) / torch.exp(r).sum()          # Eq. 7: T softmax(r / temperature)
    torch.testing.assert_close(dwa.loss_weights(), expect)
    L = [torch.tensor(1.0), torch.tensor(1.0)]
    assert [float(x) for x in dwa.terms(L, torch.stack(L), StepContext())] == \
        pytest.approx(expect.tolist())
    dwa2 = setup_method("dwa", 2)
    dwa2.load_state_dict(dwa.state_dict())
    torch.testing.assert_close(dwa2.loss_weights(), expect)


def test_mtloptimizer_end_epoch_uses_the_mean_of_the_seen_losses():
    model = TwoTask()
    opt = optimizer(model, "dwa")
    seen = []
    for epoch in range(2):
        for seed in (1, 2):
            x, y = batch(seed)
            losses = model.losses(x, y)
            seen.append(torch.stack([v.detach() for v in losses]))
            opt.zero_grad()
            opt.backward(losses)
            opt.step()
        opt.end_epoch()
    means = [torch.stack(seen[:2]).mean(0), torch.stack(seen[2:]).mean(0)]
    r = means[1] / means[0]
    torch.testing.assert_close(opt.method.loss_weights(), 2 * torch.softmax(r / 2.0, 0))
    with pytest.raises(ValueError, match="no backward since the last call"):
        opt.end_epoch()
