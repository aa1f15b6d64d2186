"""Krum / Multi-Krum (Blanchard et al., NeurIPS 2017) against TorchJD's ``Krum`` aggregator, and
against a vector-form oracle of the paper's Krum choice (Sec. 4: score ``s(i)`` = the sum of the
squared distances to the ``n - f - 2`` closest vectors, pick the minimum; Multi-Krum: average
the ``m`` best) written on the task gradients for ``squared=True``."""
import itertools

import pytest
import torch

from gradops.weighting import StepContext, get_method
from gradops.weighting._krum import Krum, krum

J5 = torch.tensor([[1.0, 0.0, 2.0, -1.0], [-1.0, 1.0, 0.0, 0.5], [0.5, -2.0, 1.0, 0.0],
                   [0.8, 0.2, 1.5, -0.5], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


def oracle_multikrum(J: torch.Tensor, f: int, m: int, squared: bool) -> torch.Tensor:
    """The paper's choice function on the vectors (loops, no Gram), then the mean of the ``m``
    best-scored vectors."""
    T = J.shape[0]
    scores = []
    for i in range(T):
        d = sorted(float(torch.linalg.vector_norm(J[i] - J[j])) ** (2 if squared else 1)
                   for j in range(T) if j != i)
        scores.append(sum(d[:T - f - 2]))
    best = sorted(range(T), key=lambda i: scores[i])[:m]
    return J[best].mean(0)


def _J(T: int, P: int, seed: int) -> torch.Tensor:
    return torch.randn(T, P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_declaration_and_option_errors():
    assert get_method("Krum") is Krum and Krum.kind == "gram" and Krum.scale_invariant
    with pytest.raises(ValueError, match="option 'n_byzantine' must be >= 0"):
        Krum(n_byzantine=-1)
    with pytest.raises(ValueError, match="option 'n_selected' must be >= 1"):
        Krum(n_selected=0)
    with pytest.raises(ValueError, match="option 'squared' must be bool"):
        Krum(squared=1)
    with pytest.raises(ValueError, match="n_selected = 4 exceeds the number of tasks T = 3"):
        krum(torch.eye(3), n_selected=4)


# T - f - 2 >= 2: no structural tie (with one neighbour, mutual nearest neighbours tie)
CASES = [(T, f, m) for T in (4, 6, 9) for f in range(0, T - 3) for m in (1, 2, 3)
         if T - f - 2 >= 2 and m <= T]


def test_agrees_with_torchjds_krum_aggregator():
    pytest.importorskip("torchjd")
    from torchjd.aggregation import Krum as TorchJDKrum
    worst = 0.0
    for (T, f, m), seed in zip(CASES, itertools.count()):
        J = _J(T, 7, seed)
        w = Krum(n_byzantine=f, n_selected=m).weights(J @ J.T, StepContext(
            dtype=torch.float64))[0]
        worst = max(worst, float((w @ J - TorchJDKrum(f, m)(J)).abs().max()))
    assert worst < 1e-12, worst                      # measured: 0 (the same rows are averaged)


@pytest.mark.parametrize("squared", [False, True])
def test_agrees_with_the_vector_form_oracle(squared):
    worst = 0.0
    for (T, f, m), seed in zip(CASES, itertools.count(100)):
        J = _J(T, 5, seed)
        d = krum(J @ J.T, f, m, squared) @ J
        worst = max(worst, float((d - oracle_multikrum(J, f, m, squared)).abs().max()))
    assert worst < 1e-12, worst


def test_pinned_values_and_ties():
    """Computed once by :func:`krum` after it agreed with TorchJD and the oracle."""
    G = J5 @ J5.T
    assert torch.equal(krum(G), torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(krum(G, 1, 3), torch.tensor([1 / 3, 0, 0, 1 / 3, 1 / 3],
                                                          dtype=torch.float64))
    # squared distances (the paper) pick another pair here than distances (TorchJD)
    assert torch.equal(krum(G, 0, 2, squared=True),
                       torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5], dtype=torch.float64))
    assert torch.equal(krum(G, 0, 2), torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0],
                                                   dtype=torch.float64))
    # f = T - 3: one neighbour, so the closest pair (tasks 0 and 3) ties: it shares the weight
    # (TorchJD's topk takes the lower index, task 0)
    assert torch.equal(krum(G, 2, 1), torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0],
                                                   dtype=torch.float64))


def test_too_few_tasks_say_so_and_nonfinite():
    G = J5[:2] @ J5[:2].T
    w, st = krum(G, return_status=True)             # T = 2 < f + 3: no neighbours, all tie
    torch.testing.assert_close(w, torch.full((2,), 0.5, dtype=torch.float64))
    assert not bool(st.converged)
    w, st = krum(J5 @ J5.T, 2, 1, return_status=True)
    assert bool(st.converged)
    assert not bool(krum(J5 @ J5.T, 3, 1, return_status=True)[1].converged)
    G = J5 @ J5.T
    G[4, 4] = float("nan")
    w, st = krum(G, return_status=True)
    assert torch.isnan(w).all() and not bool(st.converged)
    assert krum(G.float()).dtype == torch.float32
