"""ConFIG (Liu, Chu & Thuerey, ICLR 2025): the Gram-form weights against TorchJD's ``ConFIG``
aggregator (an aggregator over ``J``, so the updates ``d = w^T J`` are compared, not weights),
and the paper's defining property (Eq. 2: equal projections on every unit gradient)."""
import pytest
import torch

from gradops.weighting import StepContext, get_method
from gradops.weighting._config import ConFIG, config

J3 = torch.tensor([[1.0, 0.0, 2.0, -1.0], [-1.0, 1.0, 0.0, 0.5], [0.5, -2.0, 1.0, 0.0]],
                  dtype=torch.float64)


def _J(T: int, P: int, seed: int) -> torch.Tensor:
    J = torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    J[1:] -= 0.7 * J[0]
    return J


def test_declaration_and_option_errors():
    assert get_method("ConFIG") is ConFIG and ConFIG.kind == "gram" and not ConFIG.iterative
    with pytest.raises(ValueError, match="option 'rcond' must be >= 0 or None"):
        ConFIG(rcond=-1.0)


CASES = [(1, 5, 0), (2, 9, 1), (3, 4, 2), (5, 40, 3), (8, 12, 4), (6, 3, 5)]   # last: T > P


def test_agrees_with_torchjds_config_aggregator():
    pytest.importorskip("torchjd")
    from torchjd.aggregation import ConFIG as TorchJDConFIG
    agg = TorchJDConFIG()
    worst = 0.0
    for T, P, seed in CASES:
        J = _J(T, P, seed)
        w = ConFIG().weights(J @ J.T, StepContext(dtype=torch.float64))[0]
        worst = max(worst, float((w @ J - agg(J)).abs().max() / J.norm(dim=1).max()))
    J = J3.clone()
    J[1] = 0.0                                        # a zero gradient: TorchJD's nan_to_num
    worst = max(worst, float((config(J @ J.T) @ J - agg(J)).abs().max()))
    assert worst < 1e-10, worst                      # measured: <= 5e-14


def test_equal_unit_projections_and_sum_scale():
    """Eq. 2: ``u_i . g_u`` is the same for every task; the length is the sum of projections."""
    J = _J(4, 10, 7)
    d = config(J @ J.T) @ J
    U = J / J.norm(dim=1, keepdim=True)
    p = U @ d
    torch.testing.assert_close(p, p.mean().expand(4), rtol=1e-12, atol=0)
    gu = d / d.norm()
    torch.testing.assert_close(d.norm(), (J @ gu).sum(), rtol=1e-12, atol=0)
    g = torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Jsame = torch.stack([g, g, g])                    # identical tasks: the sum (EW's scale)
    torch.testing.assert_close(config(Jsame @ Jsame.T) @ Jsame, 3 * g)


def test_pinned_values():
    """Computed once by :func:`config` after it agreed with TorchJD."""
    w = config(J3 @ J3.T)
    torch.testing.assert_close(w, torch.tensor([0.337660577847, 1.940811762438, 1.092164752403],
                                               dtype=torch.float64), atol=1e-11, rtol=0)
    torch.testing.assert_close(w @ J3, torch.tensor([-1.057068808389, -0.243517742368,
                                                     1.767485908097, 0.632745303372],
                                                    dtype=torch.float64), atol=1e-11, rtol=0)


def test_zero_gradients_float32_and_nonfinite():
    w, st = config(torch.zeros(3, 3), return_status=True)
    assert torch.equal(w, torch.zeros(3)) and bool(st.converged)
    wf = config((J3 @ J3.T).float())
    assert wf.dtype == torch.float32
    torch.testing.assert_close(wf.double(), config(J3 @ J3.T), atol=1e-5, rtol=0)
    G = J3 @ J3.T
    G[1, 0] = float("nan")
    w, st = config(G, return_status=True)
    assert not torch.isfinite(w).any() and not bool(st.converged)
