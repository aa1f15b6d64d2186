"""IMTL (Liu et al., ICLR 2021), IMTL-L + IMTL-G, against LibMTL's IMTL.backward rewritten in
vector form (scaled losses ``loss_scale.exp() * losses - loss_scale``, per-task gradients of
the shared parameters, ``alpha`` from the paper's ``D`` / ``U`` closed form with
``torch.inverse``), and the gradient balance against TorchJD's IMTL-G weighting."""
import pytest
import torch

from gradops.weighting import IMTL, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


def libmtl_alpha(grads: torch.Tensor) -> torch.Tensor:
    """LibMTL/weighting/IMTL.py: the paper's IMTL-G closed form."""
    T = grads.shape[0]
    unit = grads / torch.norm(grads, p=2, dim=-1, keepdim=True)
    D = grads[0:1].repeat(T - 1, 1) - grads[1:]
    U = unit[0:1].repeat(T - 1, 1) - unit[1:]
    alpha = torch.matmul(torch.matmul(grads[0], U.t()), torch.inverse(torch.matmul(D, U.t())))
    return torch.cat((1 - alpha.sum().unsqueeze(0), alpha), dim=0)


def _J(T, P=7, seed=0):
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_declaration_and_options():
    assert get_method("IMTL") is IMTL and IMTL.has_parameters and IMTL.weights_from_gram
    assert IMTL.scale_invariant and IMTL().torchjd(3) is None
    with pytest.raises(ValueError, match="'ridge' must be >= 0"):
        IMTL(ridge=-1.0)
    with pytest.raises(ValueError, match="'rcond' must be >= 0"):
        IMTL(rcond=-1.0)


@pytest.mark.parametrize("T", [2, 3, 5])
def test_gradient_balance_is_libmtls_and_torchjds(T):
    imtl = setup_method("imtl", T)
    J = _J(T, seed=T)
    w, status = imtl.weights(J @ J.T, StepContext(dtype=torch.float64))
    ref = libmtl_alpha(J)
    torch.testing.assert_close(w, ref, rtol=1e-9, atol=1e-10)
    A = pytest.importorskip("torchjd.aggregation")
    jd = A.IMTLG()(J)
    torch.testing.assert_close(w @ J, jd, rtol=1e-9, atol=1e-10)
    assert bool(status.converged)
    u = (w @ J) @ (J / J.norm(dim=1, keepdim=True)).T      # equal projections on unit g_t
    torch.testing.assert_close(u, u[0].expand(T))
    print(f"IMTL T={T}: max abs diff vs LibMTL alpha {float((w - ref).abs().max()):.3g}, "
          f"vs TorchJD d {float((w @ J - jd).abs().max()):.3g}")


def test_pinned_weights():
    """Pinned from this implementation after it agreed with the oracles above."""
    J = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    w, _ = setup_method("imtl", 2).weights(J @ J.T, StepContext(dtype=torch.float64))
    # d = a g1 + (1-a) g2 = (1, 2(1-a)) with d.u1 = d.u2: a = (5 - sqrt 5) / 4 = 0.690983...
    torch.testing.assert_close(w, torch.tensor([0.690983005625, 0.309016994375],
                                               dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(w[0], torch.tensor((5 - 5 ** 0.5) / 4, dtype=torch.float64))


def test_mtloptimizer_step_is_libmtls_imtl():
    """One MTLOptimizer step against LibMTL's IMTL.backward (vector form): the shared gradient
    ``alpha^T grads`` of the scaled losses, the heads' gradients of the scaled losses, and
    ``loss_scale.grad`` (accumulated by LibMTL's per-task backward passes)."""
    model, ref_model = TwoTask(), TwoTask()
    opt = optimizer(model, "imtl", num_tasks=2)
    assert opt.param_groups[1]["params"][0] is opt.method.log_scales
    s0 = torch.tensor([0.3, -0.2])
    with torch.no_grad():
        opt.method.log_scales.copy_(s0)
    x, y = batch()
    opt.zero_grad()
    opt.backward(model.losses(x, y))
    # LibMTL
    loss_scale = s0.clone().requires_grad_(True)
    losses = torch.stack(ref_model.losses(x, y))
    scaled = loss_scale.exp() * losses - loss_scale
    shared = list(ref_model.encoder.parameters())
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        scaled[t], shared, retain_graph=True)]) for t in range(2)])
    alpha = libmtl_alpha(grads.double()).float()
    scaled.sum().backward()          # heads and loss_scale: the per-task backwards' sum
    new = alpha @ grads
    got = torch.cat([model.encoder.weight.grad.reshape(-1), model.encoder.bias.grad])
    torch.testing.assert_close(got, new, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.method.log_scales.grad, loss_scale.grad)
    for h, hr in zip(model.heads.parameters(), ref_model.heads.parameters()):
        torch.testing.assert_close(h.grad, hr.grad)
    print(f"IMTL MTLOptimizer step: max abs diff vs LibMTL {float((got - new).abs().max()):.3g}")
    opt.step()
    torch.testing.assert_close(opt.method.log_scales.detach(), s0 - 0.1 * loss_scale.grad)


def test_scaled_losses_scale_the_terms_and_nan_propagates():
    imtl = setup_method("imtl", 2)
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.3, -0.2]))
    L = [torch.tensor(2.0), torch.tensor(3.0)]
    s = torch.tensor(1024.0)
    plain = imtl.terms(L, torch.stack(L), StepContext())
    scaled = imtl.terms([v * s for v in L], torch.stack(L), StepContext(scale=s))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b.detach(), a.detach() * s)
    G = torch.tensor([[1.0, float("nan")], [float("nan"), 2.0]])
    w, status = imtl.weights(G, StepContext())
    assert not torch.isfinite(w).all() and not bool(status.converged)
