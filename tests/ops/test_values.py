"""Pinned values (in the style of TorchJD's ``tests/unit/aggregation/test_values.py``): every op
and every weighting on one tiny fixed ``J`` (T = 3 tasks, P = 4 coordinates, simple numbers with
two conflicting pairs), against hard-coded results, on every backend (torch, C++, Triton under the
interpreter; and on CUDA with torch, CUDA C++ and Triton when a GPU is present), at a float32
tolerance.

How the numbers were made (once, in float64, not by the code under test): the ops' outputs by
the references of ``gradops.reference`` on ``J.double()`` (``gram_reference``,
``sign_counts_reference``, ``segment_gram_reference``, ``combine_reference``,
``pcgrad_reference``, ``graddrop_reference`` with ``philox_uniform_reference`` for the seeded
draw, ``topk_mask_reference``, ``linear_gram_reference`` / ``linear_combine_reference``; the
metrics from the vectors' norms and cosines); the weightings' updates ``d`` by the vector-form
oracles of ``tests/method_references.py`` (``mgda_reference`` (Wolfe), ``cagrad_reference``
(SLSQP, smoothing ``sqrt(eps_fp32)`` as gradops uses in float32), ``imtlg_reference``,
``nashmtl_reference`` (scipy), ``alignedmtl_reference`` (SVD), ``gradvac_reference``) and their
weights as the unique ``w`` with ``J^T w = d`` (``J`` has full row rank; ``lstsq`` in float64)
where the oracle does not return them; printed rounded to 9 decimals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import gradops
from gradops import metrics as M
from gradops import weighting as W

from _asserts import on_backend

J = torch.tensor([[1.0, -2.0, 0.5, 3.0],
                  [-1.5, 1.0, 2.0, -0.5],
                  [2.0, 0.5, -1.0, 1.0]])
OFFSETS = torch.tensor([0, 2, 2, 4])      # two segments of two columns and an empty one between
PERMS = torch.tensor([[1, 2, 0], [2, 0, 1], [0, 1, 2]])      # PCGrad's / GradVac's orders
PERMS_L = torch.stack([PERMS, PERMS.flip(1), PERMS[[2, 0, 1]]])   # one order per segment
WEIGHTS = [1.0, -0.5, 2.0]
WEIGHTS_L = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 2.0, -1.0]]
NOISE = [0.1, 0.9, 0.5, 0.3]              # GradDrop's uniform numbers, one per column
LEAK = [0.0, 0.5, 1.0]
LOSSES = [0.5, 2.0, 1.0]
W_TOPK = torch.tensor([[1.0, -2.0, 2.0, 0.0],     # ties: |-2| = |2|, |0.5| x 3, |4| = |-4|
                       [0.5, -0.5, 0.5, 3.0],
                       [-1.0, 0.0, 4.0, -4.0]])
X_LINEAR = torch.tensor([[1.0, 0.5, -1.0], [2.0, -1.0, 0.5]])   # a Linear layer's input [N, in]
TARGETS = torch.tensor([[0.0, 0.2, -0.1], [0.3, 0.0, 0.5], [-0.4, 0.1, 0.0]]) \
    * torch.tensor([1.0, 0.5, -1.0])[:, None, None]            # GradVac's EMA targets [L, T, T]
TIGHT = {"max_iter": 300, "tol": 1e-7}   # MGDA's gap tolerance at float32's resolution


@dataclass(frozen=True)
class Pinned:
    name: str
    fn: Callable[[torch.Tensor], tuple]    # J (on the device) -> outputs
    expected: tuple                        # one nested list per output
    atol: float = 1e-5

    def __str__(self) -> str:
        return self.name


def on(x, dev: torch.device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32).to(dev) if not isinstance(x, torch.Tensor) \
        else x.to(dev)


def weighted(f: Callable, **kw) -> Callable:
    """``J -> (w, d)`` for a weighting ``f(G, **kw)`` (``kw`` values given as lists become
    float32 tensors on J's device)."""
    def fn(J):
        args = {k: on(v, J.device) if isinstance(v, list) else v for k, v in kw.items()}
        w = f(gradops.gram(J), **args)
        return w, gradops.combine(J, w)
    return fn


def _gradvac(J):
    w, targets = W.gradvac_weights(gradops.segment_gram(J, OFFSETS), TARGETS.to(J.device),
                                   PERMS.to(J.device), beta=0.5, eps=1e-8)
    return gradops.combine(J, w, OFFSETS), targets


def _metrics(J):
    G = gradops.gram(J)
    counts = gradops.gram(J, return_sign_counts=True)
    return (M.norms(G), M.cosine(G), M.gms(G), M.conflict_counts(G),
            M.conflict_counts(G, -0.5), M.conflict_incidence(G),
            M.sign_conflict_ratio(counts.opposite, counts.both_nonzero))


GRAM = [[14.25, -4.0, 3.5], [-4.0, 7.5, -5.0], [3.5, -5.0, 6.25]]

VALUES = [
    Pinned("gram", lambda J: (gradops.gram(J),), (GRAM,)),
    Pinned("gram_sign_counts", lambda J: tuple(gradops.gram(J, return_sign_counts=True)),
           (GRAM, [[0, 3, 2], [3, 0, 3], [2, 3, 0]], [[4, 4, 4], [4, 4, 4], [4, 4, 4]])),
    Pinned("segment_gram", lambda J: (gradops.segment_gram(J, OFFSETS),),
           ([[[5.0, -3.5, 1.0], [-3.5, 3.25, -2.5], [1.0, -2.5, 4.25]],
             [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
             [[9.25, -0.5, 2.5], [-0.5, 4.25, -2.5], [2.5, -2.5, 2.0]]],)),
    Pinned("combine", lambda J: (gradops.combine(J, on(WEIGHTS, J.device)),),
           ([5.75, -1.5, -2.5, 5.25],)),
    Pinned("combine_segments",
           lambda J: (gradops.combine(J, on(WEIGHTS_L, J.device), OFFSETS),),
           ([1.5, -0.5, 5.25, -0.5],)),
    Pinned("pcgrad",
           lambda J: gradops.pcgrad(J, perms=PERMS.to(J.device), return_weights=True),
           ([1.384210526, 0.931578947, 3.142105263, 3.952631579], [1.084210526, 2.2, 1.8])),
    # the paper's j != i (segment 0 changed from the self-visiting values below, gradops < 0.1)
    Pinned("pcgrad_per_layer",
           lambda J: (gradops.pcgrad(J, perms=PERMS_L.to(J.device), offsets=OFFSETS),),
           ([1.285972851, 0.674660633, 1.661764706, 4.397058824],)),
    Pinned("pcgrad_per_layer_libmtl_self_visit",
           lambda J: (gradops.pcgrad(J, perms=PERMS_L.to(J.device), offsets=OFFSETS,
                                     libmtl_self_visit=True),),
           ([1.166515837, 0.754298643, 1.661764706, 4.397058824],)),
    Pinned("graddrop",
           lambda J: gradops.graddrop(J, noise=on(NOISE, J.device), leak=on(LEAK, J.device),
                                      return_mask=True),
           ([2.25, -1.0, 1.5, 3.75],
            [[True, True, True, True], [False, False, True, False],
             [True, False, False, True]])),
    # the seed drawn from this generator makes Philox's U = [0.8919, 0.3130, 0.7284, 0.7893]
    Pinned("graddrop_seeded",
           lambda J: (gradops.graddrop(J, generator=torch.Generator().manual_seed(0)),),
           ([-1.5, 1.5, -1.0, 4.0],)),
    Pinned("topk_mask", lambda J: (gradops.topk_mask(W_TOPK.to(J.device), 2),),
           ([[False, True, True, False], [True, False, False, True],
             [False, False, True, True]],)),
    Pinned("topk_indices", lambda J: (gradops.topk_indices(W_TOPK.to(J.device), 2),),
           ([[1, 2], [0, 3], [2, 3]],)),
    Pinned("linear_gram",
           lambda J: (gradops.linear_gram(X_LINEAR.to(J.device), J.reshape(3, 2, 2), bias=True),),
           ([[52.0625, -4.0, 17.875], [-4.0, 23.125, -11.25], [17.875, -11.25, 20.3125]],)),
    Pinned("linear_combine",
           lambda J: (gradops.linear_combine(X_LINEAR.to(J.device), J.reshape(3, 2, 2),
                                             on(WEIGHTS, J.device)),),
           ([[0.75, 5.375, -7.0], [9.0, -6.0, 4.125]],)),
    Pinned("metrics", _metrics,
           ([3.774917218, 2.738612788, 2.5],
            [[1.0, -0.386920667, 0.37086906], [-0.386920667, 1.0, -0.730296743],
             [0.37086906, -0.730296743, 1.0]],
            [[1.0, 0.950624052, 0.920711516], [0.950624052, 1.0, 0.995859195],
             [0.920711516, 0.995859195, 1.0]],
            2, 1, 2 / 3,
            [[0.0, 0.75, 0.5], [0.75, 0.0, 0.75], [0.5, 0.75, 0.0]])),
    # the weightings: (w, d = w^T J)
    Pinned("ew", weighted(W.ew), ([1.0, 1.0, 1.0], [1.5, -0.5, 1.5, 3.5])),
    Pinned("ew_mean", weighted(W.ew, reduction="mean"),
           ([1 / 3] * 3, [0.5, -1 / 6, 0.5, 7 / 6])),
    Pinned("mgda", weighted(W.mgda, **TIGHT),
           ([0.075433231, 0.4617737, 0.462793068],
            [0.308358818, 0.542303772, 0.498470948, 0.458205912]), atol=2e-5),
    Pinned("mgda_l2", weighted(W.mgda, normalization="l2", **TIGHT),
           ([0.03842691, 0.167688994, 0.158282548],
            [0.103458515, 0.169976448, 0.196308896, 0.189718782]), atol=2e-5),
    Pinned("mgda_loss", weighted(W.mgda, normalization="loss", losses=LOSSES, **TIGHT),
           ([0.030697266, 0.33464893, 0.315353506],
            [0.159430882, 0.43093115, 0.369292988, 0.24012084]), atol=2e-5),
    Pinned("cagrad", weighted(W.cagrad),
           ([0.287356322, 0.510046519, 0.375147474],
            [0.272581491, 0.122907612, 0.788623725, 0.98219318]), atol=2e-5),
    Pinned("imtlg", weighted(W.imtlg),
           ([0.105453001, 0.460180314, 0.434366685],
            [0.283915901, 0.466457655, 0.538720443, 0.520635531])),
    Pinned("nashmtl", weighted(W.nashmtl),
           ([0.168121513, 0.45574608, 0.402841624],
            [0.290185641, 0.320923866, 0.592711292, 0.679333122]), atol=2e-5),
    Pinned("alignedmtl", weighted(W.alignedmtl),
           ([0.393187853, 1.02759991, 0.977539976],
            [0.806867941, 0.729994192, 1.274253771, 1.643303581])),
    Pinned("alignedmtl_median", weighted(W.alignedmtl, scale_mode="median"),
           ([0.802066785, 2.096208593, 1.994090967],
            [1.645935829, 1.489120506, 2.599359612, 3.352187026])),
    Pinned("alignedmtl_rmse", weighted(W.alignedmtl, scale_mode="rmse"),
           ([0.886499162, 2.316873351, 2.204005954],
            [1.819201043, 1.645878005, 2.872990329, 3.705066764])),
    Pinned("pcgrad_weighting", lambda J: weighted(W.pcgrad, perms=PERMS.to(J.device))(J),
           ([1.084210526, 2.2, 1.8], [1.384210526, 0.931578947, 3.142105263, 3.952631579])),
    # per layer: (d, new targets); segment 0's weights are not pinned by d (2 columns, 3 tasks)
    Pinned("gradvac", _gradvac,
           ([1.880223442, 0.951508213, 1.788539449, 4.0406056],
            [[[0.0, -0.33412157, -0.479762398], [-0.218468783, 0.0, -0.086336396],
              [-0.091534771, -0.286336396, 0.0]],
             [[0.0, 0.05, -0.025], [0.075, 0.0, 0.125], [-0.1, 0.025, 0.0]],
             [[0.0, -0.139872611, 0.340619096], [0.057047373, 0.0, -0.678746461],
              [0.490619096, -0.478746461, 0.0]]])),
]


@pytest.mark.parametrize("role", ["torch", "native", "triton"])
@pytest.mark.parametrize("case", VALUES, ids=str)
def test_pinned_value(case, role, device):
    with on_backend(device, role):
        outs = case.fn(J.to(device))
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    assert len(outs) == len(case.expected), f"{case}: {len(outs)} outputs"
    for k, (y, e) in enumerate(zip(outs, case.expected)):
        assert y.device.type == device.type, f"{case}[{k}]: on {y.device}"
        y = y.cpu()
        if y.dtype == torch.bool or not y.is_floating_point():
            assert y.tolist() == e, f"{case}[{k}]: {y.tolist()} != {e}"
            continue
        assert y.dtype == torch.float32, f"{case}[{k}]: {y.dtype}"
        torch.testing.assert_close(y.double(), torch.tensor(e, dtype=torch.float64),
                                   rtol=1e-5, atol=case.atol, msg=lambda m: f"{case}[{k}]: {m}")


def test_the_tiny_J_has_what_the_table_needs():
    """Two conflicting pairs (negative off-diagonal Gram entries) and full row rank in ``J``
    (the weights are then determined by the updates) and in each non-empty segment's Gram
    restricted to two tasks (no two task gradients collinear: GradVac and PCGrad per layer are
    well conditioned)."""
    G = J.double() @ J.double().T
    assert int((G < 0).triu(1).sum()) == 2
    assert int(torch.linalg.matrix_rank(J.double())) == 3
    for a, b in ((0, 2), (2, 4)):
        cos = gradops.metrics.cosine(J[:, a:b].double() @ J[:, a:b].double().T)
        assert float(cos.triu(1).abs().max()) < 0.99
