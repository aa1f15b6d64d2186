"""GLS (Chennupati et al., CVPR-W 2019): the terms' gradient against LibMTL's geometric-mean
loss (autograd through ``torch.pow(losses.prod(), 1/T)``, LibMTL's ``GLS.backward``)."""
import math

import pytest
import torch

from gradops.weighting import GLS, StepContext, get_method
from loss_helpers import TwoTask, batch, optimizer, setup_method


def _losses(x):
    return [x[0] ** 2 + 0.1, (x[1] - 1) ** 2 + 0.5, 3 * x[2] ** 2 + x[0] * x[1] + 1.0]


def test_declaration():
    assert get_method("GLS") is GLS and GLS.kind == "loss" and not GLS.weights_from_gram
    assert GLS().torchjd(3) is None


def test_gradient_is_libmtls_geometric_mean_gradient():
    """Oracle: LibMTL's GLS.backward, ``loss = torch.pow(losses.prod(), 1./T)``, by autograd."""
    gls = setup_method("gls", 3)
    x = torch.tensor([0.7, 2.0, -0.4], dtype=torch.float64, requires_grad=True)
    L = _losses(x)
    values = torch.stack([v.detach() for v in L])
    g_terms, = torch.autograd.grad(sum(gls.terms(L, values, StepContext())), x,
                                   retain_graph=True)
    g_libmtl, = torch.autograd.grad(torch.pow(torch.stack(L).prod(), 1.0 / 3), x)
    torch.testing.assert_close(g_terms, g_libmtl, rtol=1e-12, atol=1e-12)
    print("GLS max abs diff vs LibMTL:", float((g_terms - g_libmtl).abs().max()))


def test_pinned_coefficients():
    """Pinned from this implementation after it agreed with the oracle above."""
    gls = setup_method("gls", 3)
    a = gls.coefficients(torch.tensor([1.0, 2.0, 4.0]))
    # (1*2*4)^(1/3) = 2: a = 2 / (3 L)
    torch.testing.assert_close(a, torch.tensor([2 / 3, 1 / 3, 1 / 6]))
    # many small losses: the product would underflow in float32, the log-mean does not
    a = gls.coefficients(torch.full((40,), 1e-3))
    torch.testing.assert_close(a, torch.full((40,), 1 / 40))


def test_mtloptimizer_gradient_and_scaled_losses():
    model = TwoTask()
    opt = optimizer(model, "gls")
    x, y = batch()
    L = model.losses(x, y)
    ref, = torch.autograd.grad(torch.pow(torch.stack(L).prod(), 0.5), model.encoder.weight,
                               retain_graph=True)
    opt.zero_grad()
    opt.backward(L)
    torch.testing.assert_close(model.encoder.weight.grad, ref)
    # under AMP the losses arrive scaled by s: the terms are s times the unscaled ones
    gls = setup_method("gls", 2)
    v = torch.tensor([2.0, 3.0])
    s = torch.tensor(1024.0)
    plain = gls.terms(list(v), v, StepContext())
    scaled = gls.terms(list(v * s), v, StepContext(scale=s))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b, a * s)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_nonpositive_or_nan_loss_gives_nan(bad):
    gls = setup_method("gls", 2)
    v = torch.tensor([bad, 1.0])
    terms = gls.terms(list(v), v, StepContext())
    assert not torch.isfinite(torch.stack(terms)).all()
