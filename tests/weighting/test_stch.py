"""STCH (Lin et al., ICML 2024): the terms' gradient against LibMTL's STCH.backward (rewritten
here in vector form, step for step: warm-up log losses, nadir from the warm-up epoch, then
``mu * log(sum(exp(reg_losses / mu))) * T``), over several epochs."""
import pytest
import torch

from gradops.weighting import STCH, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


class LibMTLSTCH:
    """LibMTL/weighting/STCH.py's init_param + backward, without the trainer (returns the
    scalar loss whose ``backward`` LibMTL calls)."""

    def __init__(self, T, mu, warmup_epoch):
        self.T, self.mu, self.warmup = T, mu, warmup_epoch
        self.epoch, self.nadir_vector = 0, None
        self.average_loss, self.average_loss_count = 0.0, 0

    def loss(self, losses):
        if self.epoch < self.warmup:
            return torch.log(losses + 1e-20).sum()
        if self.epoch == self.warmup:
            self.average_loss += losses.detach()
            self.average_loss_count += 1
            return torch.log(losses + 1e-20).sum()
        if self.nadir_vector is None:
            self.nadir_vector = self.average_loss / self.average_loss_count
        losses = torch.log(losses / self.nadir_vector + 1e-20)
        reg = losses - torch.max(losses.data).detach()
        return self.mu * torch.log(torch.sum(torch.exp(reg / self.mu))) * self.T


def _losses(x, k):
    s = 1.0 + 0.3 * k
    return [s * x[0] ** 2 + 0.1, (x[1] - s) ** 2 + 0.5, 3 * x[2] ** 2 + x[0] * x[1] / s + 1.0]


def test_declaration_and_options():
    assert get_method("STCH") is STCH and STCH.kind == "loss"
    assert STCH().torchjd(3) is None
    with pytest.raises(ValueError, match="'mu' must be > 0"):
        STCH(mu=0.0)
    with pytest.raises(ValueError, match="'warmup_epoch' must be >= 0"):
        STCH(warmup_epoch=-1)
    with pytest.raises(ValueError, match="'eps' must be >= 0"):
        STCH(eps=-1.0)


@pytest.mark.parametrize("mu,warmup", [(1.0, 1), (0.3, 0), (2.0, 2)])
def test_gradients_follow_libmtl_through_warmup_nadir_and_stch(mu, warmup):
    """Oracle: LibMTL's STCH.backward (class above); 2 steps per epoch, 5 epochs."""
    stch = setup_method("stch", 3, mu=mu, warmup_epoch=warmup)
    ref = LibMTLSTCH(3, mu, warmup)
    x = torch.tensor([0.7, 2.0, -0.4], dtype=torch.float64, requires_grad=True)
    worst = 0.0
    for epoch in range(5):
        for k in range(2):
            L = _losses(x * (1 + 0.1 * k), epoch + k)
            values = torch.stack([v.detach() for v in L])
            g, = torch.autograd.grad(sum(stch.terms(L, values, StepContext())), x,
                                     retain_graph=True)
            g_ref, = torch.autograd.grad(ref.loss(torch.stack(L)), x)
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
            worst = max(worst, float((g - g_ref).abs().max()))
        stch.end_epoch(values)
        ref.epoch += 1
    torch.testing.assert_close(stch.nadir, ref.nadir_vector)
    print(f"STCH mu={mu} warmup={warmup}: max abs diff vs LibMTL {worst:.3g}")


def test_pinned_coefficients():
    """Pinned from this implementation after it agreed with the oracle above."""
    stch = setup_method("stch", 3, warmup_epoch=0)
    v = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(stch.coefficients(v), 1 / v)
    stch.coefficients(torch.tensor([2.0, 2.0, 2.0]))
    stch.end_epoch(v)
    torch.testing.assert_close(stch.nadir, torch.tensor([1.5, 2.0, 3.0]))
    a = stch.coefficients(torch.tensor([1.5, 3.0, 3.0]))
    # l = log(L / n) = [0, log 1.5, 0]: softmax = [1, 1.5, 1] / 3.5, a = 3 softmax / L
    torch.testing.assert_close(a, torch.tensor([3 / 3.5 / 1.5, 4.5 / 3.5 / 3.0, 3 / 3.5 / 3.0]))
    with pytest.raises(RuntimeError, match="no step ran in the warm-up epoch"):
        s2 = setup_method("stch", 2, warmup_epoch=0)
        s2.end_epoch(torch.ones(2))


def test_mtloptimizer_resumes_after_the_nadir_bit_exactly():
    x, y = batch()

    def run(steps, state=None):
        model = TwoTask()
        opt = optimizer(model, "stch", method_options={"warmup_epoch": 1})
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        for _ in range(steps):
            opt.zero_grad()
            opt.backward(model.losses(x, y))
            opt.step()
            opt.end_epoch()
        return model, opt

    full, opt = run(4)
    assert opt.method.nadir is not None and opt.method.epoch == 4
    half, hopt = run(2)
    resumed, _ = run(2, (half.state_dict(), hopt.state_dict()))
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_scaled_losses_and_nonfinite():
    stch = setup_method("stch", 2, warmup_epoch=0)
    v = torch.tensor([2.0, 3.0])
    s = torch.tensor(1024.0)
    plain = stch.terms(list(v), v, StepContext())
    scaled = stch.terms(list(v * s), v, StepContext(scale=s))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b, a * s)
    stch.end_epoch(v)
    bad = torch.tensor([float("nan"), 1.0])
    assert not torch.isfinite(torch.stack(stch.terms(list(bad), bad, StepContext()))).all()
