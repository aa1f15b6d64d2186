"""Equal weighting, ``gradops.weighting.ew``: the weights for both reductions."""
from __future__ import annotations

import pytest
import torch

from gradops import weighting as W

from weighting_helpers import gram, make_jac


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ew(reduction):
    G = gram(make_jac(5))
    w = W.ew(G, reduction)
    torch.testing.assert_close(w, torch.full((5,), 1.0 if reduction == "sum" else 0.2,
                                             dtype=torch.float64))
