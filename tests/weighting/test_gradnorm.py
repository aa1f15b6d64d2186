"""GradNorm (Chen et al., ICML 2018) against LibMTL's GradNorm.backward rewritten in vector
form (``loss_scale = T softmax(w)``, ``G_per_loss = ||loss_scale_t g_t||``, the detached
target ``mean(G) r^alpha``, ``L_grad = |G_per_loss - target|.sum()`` backpropagated into
``w`` by autograd, the shared update ``sum_t loss_scale_t g_t``; EW in epoch 0)."""
import math

import pytest
import torch
import torch.nn.functional as F

from gradops.weighting import GradNorm, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


class LibMTLGradNorm:
    """LibMTL/weighting/GradNorm.py (rep_grad=False), given the task gradients [T, P], the
    step's losses and train_loss_buffer[:, 0]. Returns (new_grads, loss_weight); the gradient
    of w is left in ``self.loss_scale.grad``."""

    def __init__(self, T, alpha):
        self.T, self.alpha = T, alpha
        self.loss_scale = torch.nn.Parameter(torch.tensor([1.0] * T, dtype=torch.float64))

    def backward(self, grads, losses, buffer0, epoch):
        if epoch < 1:
            return grads.sum(0), torch.ones(self.T, dtype=grads.dtype)
        loss_scale = self.T * F.softmax(self.loss_scale, dim=-1)
        G_per_loss = torch.norm(loss_scale.unsqueeze(1) * grads, p=2, dim=-1)
        G = G_per_loss.mean(0)
        L_i = torch.stack([losses[tn] / buffer0[tn] for tn in range(self.T)])
        r_i = L_i / L_i.mean()
        constant_term = (G * (r_i ** self.alpha)).detach()
        L_grad = (G_per_loss - constant_term).abs().sum(0)
        L_grad.backward()
        loss_weight = loss_scale.detach().clone()
        return sum(loss_weight[i] * grads[i] for i in range(self.T)), loss_weight


def test_declaration_and_options():
    assert get_method("GradNorm") is GradNorm and GradNorm.has_parameters
    assert GradNorm.weights_from_gram and not GradNorm.scale_invariant
    assert GradNorm().torchjd(3) is None
    with pytest.raises(ValueError, match="'alpha' must be >= 0"):
        GradNorm(alpha=-0.5)
    with pytest.raises(ValueError, match="'initial' must be one of"):
        GradNorm(initial="batch")


@pytest.mark.parametrize("alpha", [1.5, 0.0, 3.0])
def test_weights_and_w_gradient_follow_libmtl_over_steps(alpha):
    """Both train w with SGD (lr 0.3) for 6 steps after an EW epoch 0."""
    T, P = 3, 8
    g = torch.Generator().manual_seed(4)
    m = setup_method("gradnorm", T, alpha=alpha)
    m.w.data = m.w.data.double()
    ref = LibMTLGradNorm(T, alpha)
    opt, ref_opt = torch.optim.SGD([m.w], lr=0.3), torch.optim.SGD([ref.loss_scale], lr=0.3)
    buffer0 = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    worst = 0.0
    for step in range(7):
        epoch = 0 if step == 0 else 1
        J = torch.randn(T, P, generator=g, dtype=torch.float64) * torch.tensor(
            [[1.0], [4.0], [0.3]], dtype=torch.float64)
        L = buffer0 * torch.rand(T, generator=g, dtype=torch.float64) * 2
        opt.zero_grad()
        ref_opt.zero_grad()
        c, status = m.weights(J @ J.T, StepContext(losses=L, dtype=torch.float64))
        d_ref, c_ref = ref.backward(J, L, buffer0, epoch)
        assert bool(status.converged)
        torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)
        worst = max(worst, float((c @ J - d_ref).abs().max()))
        if epoch == 0:
            assert m.w.grad is None and ref.loss_scale.grad is None
            m.end_epoch(buffer0)
        else:
            torch.testing.assert_close(m.w.grad, ref.loss_scale.grad, rtol=1e-10, atol=1e-12)
            worst = max(worst, float((m.w.grad - ref.loss_scale.grad).abs().max()))
        opt.step()
        ref_opt.step()
    assert not torch.allclose(m.w.detach(), torch.ones(T, dtype=torch.float64))
    torch.testing.assert_close(m.w.detach(), ref.loss_scale.detach(), rtol=1e-10, atol=1e-12)
    print(f"GradNorm alpha={alpha}: max abs diff vs LibMTL {worst:.3g}")


def test_pinned_gradient():
    """Pinned from this implementation after it agreed with the oracle above. Two tasks, norms
    [2, 1], equal loss ratios: c = [1, 1], G = [2, 1], target 1.5: v = [2, -1]."""
    m = setup_method("gradnorm", 2, initial="step")
    G = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    c, _ = m.weights(G, StepContext(losses=torch.tensor([3.0, 5.0]), dtype=torch.float64))
    torch.testing.assert_close(c, torch.ones(2, dtype=torch.float64))
    # dL/dw_j = 2 s_j (v_j - s.v), s = [1/2, 1/2]: [1.5, -1.5]
    torch.testing.assert_close(m.w.grad, torch.tensor([1.5, -1.5]))
    torch.testing.assert_close(m.initial_losses, torch.tensor([3.0, 5.0]))


def test_mtloptimizer_runs_ew_then_gradnorm_and_trains_w_with_the_model():
    model, ref_model = TwoTask(), TwoTask()
    opt = optimizer(model, "gradnorm", num_tasks=2, lr=0.1)
    assert opt.param_groups[1]["params"][0] is opt.method.w
    ref = LibMTLGradNorm(2, 1.5)
    shared, ref_shared = list(model.encoder.parameters()), list(ref_model.encoder.parameters())
    x, y = batch()
    buffer0 = None
    heads = list(ref_model.heads.parameters())
    worst = 0.0
    for step in range(4):
        L = torch.stack(ref_model.losses(x, y))
        grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            L[t], ref_shared, retain_graph=True)]) for t in range(2)]).double()
        # heads: the unweighted task gradients (LibMTL's per-task backward passes)
        head_grads = torch.autograd.grad(L.sum(), heads, retain_graph=True)
        ref.loss_scale.grad = None
        d_ref, _ = ref.backward(grads, L.detach().double(), buffer0, 0 if step < 2 else 1)
        opt.zero_grad()
        opt.backward(model.losses(x, y))
        got = torch.cat([p.grad.reshape(-1) for p in shared]).double()
        torch.testing.assert_close(got, d_ref, rtol=1e-4, atol=1e-5)
        worst = max(worst, float((got - d_ref).abs().max()))
        if step >= 2:
            torch.testing.assert_close(opt.method.w.grad.double(), ref.loss_scale.grad,
                                       rtol=1e-4, atol=1e-5)
        # the reference follows the same update (SGD, lr 0.1), w included
        with torch.no_grad():
            sizes = [p.numel() for p in ref_shared]
            for p, a in zip(ref_shared, torch.split(d_ref.float(), sizes)):
                p -= 0.1 * a.view_as(p)
            for h, gh in zip(heads, head_grads):
                h -= 0.1 * gh
            if ref.loss_scale.grad is not None:
                ref.loss_scale -= 0.1 * ref.loss_scale.grad
        opt.step()
        if step == 1:
            opt.end_epoch()
            buffer0 = opt.method.initial_losses.double()
    torch.testing.assert_close(opt.method.w.detach().double(), ref.loss_scale.detach(),
                               rtol=1e-4, atol=1e-5)
    assert not torch.equal(opt.method.w.detach(), torch.ones(2))
    print(f"GradNorm MTLOptimizer: shared grads max abs diff vs LibMTL {worst:.3g}")
    print("GradNorm MTLOptimizer: max abs diff of w vs LibMTL after 4 steps",
          float((opt.method.w.detach().double() - ref.loss_scale.detach()).abs().max()))


def test_amp_scale_and_nonfinite():
    m = setup_method("gradnorm", 2, initial="step")
    G = torch.diag(torch.tensor([4.0, 1.0]))
    L = torch.tensor([3.0, 5.0])
    m.weights(G, StepContext(losses=L, scale=torch.tensor(8.0)))
    torch.testing.assert_close(m.w.grad, 8 * torch.tensor([1.5, -1.5]))
    m.w.grad = None
    c, status = m.weights(torch.tensor([[math.nan, 0.0], [0.0, 1.0]]), StepContext(losses=L))
    assert not torch.isfinite(c).all() and not bool(status.converged)
    assert not torch.isfinite(m.w.grad).all()
