"""The shared property checks of tests/_asserts.py applied to every op and every weighting, on a
few shapes, on every backend: structure, permutation equivariance, ``J -> sJ``, non-finite
propagation, and Gram form = vector form.

Each case runs on CPU tensors with the torch reference, the C++ kernels and Triton (under the
interpreter: tiny shapes only), and on CUDA tensors with the torch, CUDA C++ and Triton backends
when a GPU is present (the ``device`` fixture; skipped, and reported so, without one).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import pytest
import torch

import gradops
from gradops import metrics as M
from gradops import weighting as W
from gradops.reference import (graddrop_reference, linear_combine_reference,
                               linear_gram_reference, pcgrad_reference, sign_counts_reference,
                               topk_mask_reference)

import method_references as R
from _asserts import (OpCase, Out, assert_gram_form_equals_vector_form,
                      assert_nonfinite_propagates, assert_permutation_equivariant,
                      assert_scaling, assert_structure, on_backend)
from helpers import make_J

# ------------------------------------------------------------------------------------------ #
# per-task arguments, segments, and where a NaN must show
# ------------------------------------------------------------------------------------------ #


def task_values(values: tuple[float, ...], T: int, pi: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """A float32 ``[T]`` per-task argument (weights, leaks, losses), permuted with the tasks."""
    v = torch.tensor([values[t % len(values)] for t in range(T)], dtype=torch.float32)
    return (v if pi is None else v[pi]).to(device)


def orders(T: int, pi: torch.Tensor | None, device: torch.device,
           batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Fixed visiting orders ``[*batch, T, T]``; for the permuted problem, new task ``k`` visits
    the (renumbered) tasks that old task ``pi[k]`` visits, in the same order."""
    perms = gradops.random_orders(T, batch, generator=torch.Generator().manual_seed(10 + T))
    if pi is not None:
        perms = torch.argsort(pi)[perms[..., pi, :]]
    return perms.to(device)


def offsets_for(P: int) -> torch.Tensor:
    """Three segments, the middle one empty (kept on the CPU, as segment_gram asks)."""
    return torch.tensor([0, P // 3, P // 3, P], dtype=torch.int64)


L = 3


def segment_of(k: int, P: int) -> int:
    o = offsets_for(P).tolist()
    return next(l for l in range(L) if o[l] <= k < o[l + 1])


def at_diag(i, k, T, P):
    return (i, i)


def at_column(i, k, T, P):
    return (k,)


def at_entry(i, k, T, P):
    return (i, k)


def anywhere(i, k, T, P):
    return (Ellipsis,)


def at_segment_diag(i, k, T, P):
    return (segment_of(k, P), i, i)


def at_segment(i, k, T, P):
    return (segment_of(k, P),)


def tasks2(T, P):
    return (T, T)


def tasks1(T, P):
    return (T,)


def columns(T, P):
    return (P,)


def scalar(T, P):
    return ()


GRAM = Out("G", tasks2, task_dims=(0, 1), degree=2, nonfinite_at=at_diag)
UPDATE = Out("d", columns, dtype=None, degree=1, odd=True, nonfinite_at=at_column)
WEIGHTS = Out("w", tasks1, task_dims=(0,), nonfinite_at=anywhere)
COMBINE_WEIGHTS = (1.0, -0.5, 2.0, 1.5, 0.0)  # the last task's weight is 0 at T = 5: a NaN there
# must still reach the result


# ------------------------------------------------------------------------------------------ #
# the ops on J
# ------------------------------------------------------------------------------------------ #

def _segment_gram64(J: torch.Tensor) -> torch.Tensor:
    o = offsets_for(J.shape[1]).tolist()
    return torch.stack([J[:, a:b] @ J[:, a:b].T for a, b in zip(o[:-1], o[1:])])


def _noise(P: int, device: torch.device) -> torch.Tensor:
    return torch.rand(P, generator=torch.Generator().manual_seed(P)).to(device)


def _linear_parts(J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``J``'s rows as a Linear layer's per-task output gradients ``D`` ``[T, N, out]`` (``N``
    the largest of 5..1 dividing ``P``) and a fixed input ``X`` ``[N, 6]``."""
    T, P = J.shape
    N = next(n for n in (5, 4, 3, 2, 1) if P % n == 0)
    X = torch.randn(N, 6, generator=torch.Generator().manual_seed(N)).to(J.dtype).to(J.device)
    return X, J.reshape(T, N, P // N)


def _linear_combine_nan(i, k, T, P):
    N = next(n for n in (5, 4, 3, 2, 1) if P % n == 0)
    return (k % (P // N), slice(None))


def _topk_indices_reference(J: torch.Tensor) -> torch.Tensor:
    mask = topk_mask_reference(J.float(), 3)
    K = min(3, J.shape[1])
    return torch.stack([torch.nonzero(r).flatten() for r in mask]).to(torch.int32).reshape(-1, K)


def _metrics(J: torch.Tensor, pi):
    G = gradops.gram(J)
    counts = gradops.gram(J, return_sign_counts=True)
    return (M.norms(G), M.cosine(G), M.gms(G), M.conflict_counts(G), M.conflict_counts(G, -0.1),
            M.conflict_incidence(G), M.sign_conflict_ratio(counts.opposite, counts.both_nonzero))


def _metrics_reference(J: torch.Tensor):
    T = J.shape[0]
    n = J.norm(dim=1)
    cos = ((J @ J.T) / (n[:, None] * n[None, :])).clamp(-1, 1)
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    gms = 2 * n[:, None] * n[None, :] / (n[:, None] ** 2 + n[None, :] ** 2)
    opp, both = sign_counts_reference(J)
    return (n, cos, gms, ((cos < 0) & upper).sum(), ((cos < -0.1) & upper).sum(),
            ((cos < 0) & upper).sum() / max(T * (T - 1) // 2, 1), opp.double() / both.double())


OPS = [
    OpCase("gram", lambda J, pi: gradops.gram(J), (GRAM,),
           reference=lambda J: (J @ J.T,)),
    OpCase("gram_sign_counts", lambda J, pi: tuple(gradops.gram(J, return_sign_counts=True)),
           (GRAM, Out("opposite", tasks2, torch.int64, (0, 1)),
            Out("both_nonzero", tasks2, torch.int64, (0, 1))),
           reference=lambda J: (J @ J.T, *sign_counts_reference(J))),
    OpCase("segment_gram", lambda J, pi: gradops.segment_gram(J, offsets_for(J.shape[1])),
           (Out("Gl", lambda T, P: (L, T, T), task_dims=(1, 2), degree=2,
                nonfinite_at=at_segment_diag),),
           reference=lambda J: (_segment_gram64(J),)),
    OpCase("combine",
           lambda J, pi: gradops.combine(J, task_values(COMBINE_WEIGHTS, J.shape[0], pi,
                                                        J.device)),
           (UPDATE,),
           reference=lambda J: (task_values(COMBINE_WEIGHTS, J.shape[0], None, J.device
                                            ).double() @ J,)),
    OpCase("combine_out",
           lambda J, pi: gradops.combine(J, task_values(COMBINE_WEIGHTS, J.shape[0], pi,
                                                        J.device), out=J.new_empty(J.shape[1])),
           (UPDATE,)),
    OpCase("combine_segments",
           lambda J, pi: gradops.combine(
               J, torch.stack([task_values(COMBINE_WEIGHTS[l:] + COMBINE_WEIGHTS[:l],
                                           J.shape[0], pi, J.device) for l in range(L)]),
               offsets_for(J.shape[1])),
           (UPDATE,)),
    OpCase("pcgrad",
           lambda J, pi: gradops.pcgrad(J, perms=orders(J.shape[0], pi, J.device),
                                        return_weights=True),
           (UPDATE, WEIGHTS),
           reference=lambda J: (pcgrad_reference(J, orders(J.shape[0], None, J.device)), None)),
    OpCase("pcgrad_per_layer",
           lambda J, pi: gradops.pcgrad(J, perms=orders(J.shape[0], pi, J.device, (L,)),
                                        offsets=offsets_for(J.shape[1]), return_weights=True),
           (UPDATE, Out("wl", lambda T, P: (L, T), task_dims=(1,), nonfinite_at=at_segment))),
    OpCase("graddrop",
           lambda J, pi: gradops.graddrop(J, noise=_noise(J.shape[1], J.device), eps=0.0,
                                          leak=task_values((0.0, 0.5, 0.25, 1.0), J.shape[0],
                                                           pi, J.device),
                                          return_mask=True),
           (UPDATE, Out("mask", lambda T, P: (T, P), torch.bool, (0,))),
           reference=lambda J: graddrop_reference(
               J, task_values((0.0, 0.5, 0.25, 1.0), J.shape[0], None, J.device),
               _noise(J.shape[1], J.device), eps=0.0),
           positive_scales_only=True),   # s < 0 flips every sign: no rule (eps = 0: exact rule)
    OpCase("graddrop_seeded",
           lambda J, pi: gradops.graddrop(J, generator=torch.Generator().manual_seed(0),
                                          eps=0.0),
           (UPDATE,), positive_scales_only=True),
    OpCase("topk_mask", lambda J, pi: gradops.topk_mask(J, 3),
           (Out("mask", lambda T, P: (T, P), torch.bool, (0,), nonfinite_at=at_entry),),
           reference=lambda J: (topk_mask_reference(J.float(), 3),)),
    OpCase("topk_indices", lambda J, pi: gradops.topk_indices(J, 3),
           (Out("idx", lambda T, P: (T, min(3, P)), torch.int32, (0,)),),
           reference=lambda J: (_topk_indices_reference(J),)),
    OpCase("linear_gram", lambda J, pi: gradops.linear_gram(*_linear_parts(J), bias=True),
           (GRAM,), reference=lambda J: (linear_gram_reference(*_linear_parts(J), bias=True),)),
    OpCase("linear_gram_eigh",
           lambda J, pi: gradops.linear_gram(*_linear_parts(J), form="eigh"),
           (GRAM,), reference=lambda J: (linear_gram_reference(*_linear_parts(J)),)),
    OpCase("linear_combine",
           lambda J, pi: gradops.linear_combine(
               *_linear_parts(J), task_values(COMBINE_WEIGHTS, J.shape[0], pi, J.device)),
           (Out("d", lambda T, P: (P // next(n for n in (5, 4, 3, 2, 1) if P % n == 0), 6),
                dtype=None, degree=1, odd=True, nonfinite_at=_linear_combine_nan),),
           reference=lambda J: (linear_combine_reference(
               *_linear_parts(J), task_values(COMBINE_WEIGHTS, J.shape[0], None, J.device)),)),
    OpCase("metrics", _metrics,
           (Out("norms", tasks1, task_dims=(0,), degree=1, nonfinite_at=lambda i, k, T, P: (i,)),
            Out("cosine", tasks2, task_dims=(0, 1), nonfinite_at=at_diag),
            Out("gms", tasks2, task_dims=(0, 1), nonfinite_at=at_diag),
            Out("conflict_counts", scalar, torch.int64),
            Out("conflict_counts_S", scalar, torch.int64),
            Out("conflict_incidence", scalar),
            Out("sign_conflict_ratio", tasks2, task_dims=(0, 1))),
           reference=_metrics_reference),
]


# ------------------------------------------------------------------------------------------ #
# the weightings: G = gram(J), w = f(G), d = combine(J, w)
# ------------------------------------------------------------------------------------------ #

def weighting(name: str, f: Callable, args: Callable = lambda T, pi, dev: {},
              w_degree: int = 0, reference: Callable | None = None, min_norm: bool = False,
              **case) -> OpCase:
    """An :class:`OpCase` for a weighting ``f(G, **args(T, pi, device)) -> w``; ``w_degree``:
    ``w(sJ) = |s|^w_degree w(J)``, so ``d = w^T J`` has degree ``w_degree + 1``. ``min_norm``:
    the weights of a point of the hull (MGDA, CAGrad's ``w*``), unique only for full-rank
    ``J``."""
    def fn(J, pi):
        w = f(gradops.gram(J), **args(J.shape[0], pi, J.device))
        return w, gradops.combine(J, w)

    outs = (Out("w", tasks1, task_dims=(0,), degree=w_degree, nonfinite_at=anywhere,
                needs_full_rank=min_norm),
            Out("d", columns, dtype=None, degree=w_degree + 1, odd=True, nonfinite_at=at_column))
    return OpCase(name, fn, outs, reference=reference, **case)


def _d(d) -> torch.Tensor:
    return torch.as_tensor(d, dtype=torch.float64)


def _imtlg_reference(J):
    d, alpha = R.imtlg_reference(J)
    return _d(alpha), _d(d)


LOSSES = (0.5, 2.0, 1.0, 0.25, 4.0)
TIGHT = {"max_iter": 500, "tol": 1e-7}   # solver budgets that reach fp32's resolution


@contextlib.contextmanager
def solver_budget(max_iter: int) -> Iterator[None]:
    """Run the iterative weightings with ``max_iter`` iterations (a NaN never converges, so
    they would run all of :data:`TIGHT`'s, in Python under the Triton interpreter)."""
    saved = TIGHT["max_iter"]
    TIGHT["max_iter"] = max_iter
    try:
        yield
    finally:
        TIGHT["max_iter"] = saved
SMOOTH32 = math.sqrt(torch.finfo(torch.float32).eps)   # CAGrad's default smoothing in fp32


def _gradvac(J, pi):
    T, P = J.shape
    offsets = offsets_for(P)
    targets = _gradvac_targets(T, pi, J.device)
    w, new_targets = W.gradvac_weights(gradops.segment_gram(J, offsets), targets,
                                       orders(T, pi, J.device), beta=0.5, eps=0.0)
    return w, new_targets, gradops.combine(J, w, offsets)


def _gradvac_targets(T, pi, device):
    t = torch.rand(L, T, T, generator=torch.Generator().manual_seed(T)) - 0.5
    if pi is not None:
        t = t[:, pi][:, :, pi]
    return t.to(device)


def _gradvac_reference(J):
    T, P = J.shape
    old = _gradvac_targets(T, None, J.device).double()
    d, tgt = R.gradvac_reference(J, offsets_for(P), orders(T, None, J.device), old, 0.5, eps=0.0)
    # where cos is undefined (the empty segment: 0/0) the oracle's EMA becomes NaN; gradops keeps
    # the old target there, as gradvac_weights documents
    return None, torch.where(torch.isfinite(tgt), tgt, old), d


WEIGHTINGS = [
    weighting("ew", W.ew, reference=lambda J: (torch.ones(J.shape[0]), J.sum(0))),
    weighting("ew_mean", W.ew, lambda T, pi, dev: {"reduction": "mean"},
              reference=lambda J: (torch.full((J.shape[0],), 1 / J.shape[0]), J.mean(0))),
    weighting("mgda", W.mgda, lambda T, pi, dev: TIGHT, min_norm=True,
              reference=lambda J: (None, _d(R.mgda_reference(J, "none"))),
              rtol=1e-4, atol=1e-4, ref_rtol=1e-3, ref_atol=1e-3),
    weighting("mgda_l2", W.mgda, lambda T, pi, dev: {"normalization": "l2", **TIGHT}, min_norm=True,
              w_degree=-1, reference=lambda J: (None, _d(R.mgda_reference(J, "l2"))),
              rtol=1e-4, atol=1e-4, ref_rtol=1e-3, ref_atol=1e-3),
    weighting("mgda_loss", W.mgda,
              lambda T, pi, dev: {"normalization": "loss", **TIGHT,
                                  "losses": task_values(LOSSES, T, pi, dev)}, min_norm=True,
              reference=lambda J: (None, _d(R.mgda_reference(
                  J, "loss", task_values(LOSSES, J.shape[0], None, J.device)))),
              rtol=1e-4, atol=1e-4, ref_rtol=1e-3, ref_atol=1e-3),
    weighting("cagrad", W.cagrad, lambda T, pi, dev: TIGHT, min_norm=True,
              reference=lambda J: (None, _d(R.cagrad_reference(J, 0.4, 1, smooth=SMOOTH32))),
              rtol=1e-4, atol=1e-4, ref_rtol=1e-3, ref_atol=1e-3),
    # for rank-deficient J, imtlg documents a least-squares compromise, not the paper's form
    weighting("imtlg", W.imtlg, reference=_imtlg_reference, rtol=1e-4, atol=1e-4,
              ref_rtol=1e-3, ref_atol=1e-4, reference_full_rank_only=True),
    weighting("nashmtl", W.nashmtl, w_degree=-1,
              reference=lambda J: tuple(_d(x) for x in R.nashmtl_reference(J, 1.0)[1::-1]),
              rtol=1e-4, atol=1e-4, ref_rtol=1e-3, ref_atol=1e-4, full_rank_only=True),
    weighting("alignedmtl", W.alignedmtl,
              reference=lambda J: (None, _d(R.alignedmtl_reference(J, "min"))),
              rtol=1e-4, atol=1e-4, ref_rtol=1e-3, ref_atol=1e-4),
    weighting("alignedmtl_rmse", W.alignedmtl, lambda T, pi, dev: {"scale_mode": "rmse"},
              reference=lambda J: (None, _d(R.alignedmtl_reference(J, "rmse"))),
              rtol=1e-4, atol=1e-4, ref_rtol=1e-3, ref_atol=1e-4),
    weighting("pcgrad_weighting", W.pcgrad, lambda T, pi, dev: {"perms": orders(T, pi, dev)},
              reference=lambda J: (None, pcgrad_reference(J, orders(J.shape[0], None, J.device)))),
    OpCase("gradvac", _gradvac,
           (Out("wl", lambda T, P: (L, T), task_dims=(1,), nonfinite_at=at_segment),
            Out("targets", lambda T, P: (L, T, T), task_dims=(1, 2)),   # non-finite: kept old
            Out("d", columns, dtype=None, degree=1, odd=True, nonfinite_at=at_column)),
           reference=_gradvac_reference, rtol=1e-4, atol=1e-4, ref_rtol=1e-3, ref_atol=1e-4,
           # collinear task gradients (P < T here) have cos = +-1 exactly, where GradVac's
           # sqrt(1 - cos^2) has an infinite slope: fp32 rounding decides, no property holds
           full_rank_only=True),
]

ALL = OPS + WEIGHTINGS

# ------------------------------------------------------------------------------------------ #
# cases: op x shape x backend (the device comes from the ``device`` fixture)
# ------------------------------------------------------------------------------------------ #

SHAPES = [(1, 17), (2, 300), (3, 17), (5, 1), (5, 300)]
TRITON_SHAPES = [(3, 17)]   # the interpreter runs every program in Python: keep it tiny
ROLES = ("torch", "native", "triton")
WITH_BACKENDS = {"mgda", "mgda_l2", "mgda_loss", "cagrad", "nashmtl", "pcgrad_weighting"}
"""The weightings with code of their own in each backend (the solvers' loops, PCGrad's
recurrence); the others (closed forms in torch) add nothing to the Gram and combine kernels that
the ops' cases test on every backend, so they run with the default backends only."""
WITH_TRITON = WITH_BACKENDS - {"mgda_loss"}   # the interpreter is slow: one MGDA variant less
SCALES = (-1e-3, 7.0)

# Bugs the checks found, now fixed: a non-finite Gram gave finite PCGrad weights (T = 1, or a NaN
# only on a visited diagonal) and finite GradVac weights; both now give NaN weights. Cases of a
# bug found later go here, as ``{test name: f(op, T, P) -> reason or None}``, each marked
# ``xfail(strict=True)``.
KNOWN_BUGS: dict = {}


def cases(ops: list[OpCase], test: str, min_T: int = 1) -> list:
    """``pytest.param(op, T, P, role)`` for every op, shape and backend role that ``test``
    applies to (with the known bugs marked ``xfail(strict=True)``)."""
    out = []
    for op in ops:
        if test == "test_gram_form_equals_vector_form" and op.reference is None:
            continue
        if test == "test_nonfinite_propagates" and all(o.nonfinite_at is None for o in op.outs):
            continue
        for role in ROLES:
            if op in WEIGHTINGS and role != "native" and op.name not in (
                    WITH_TRITON if role == "triton" else WITH_BACKENDS):
                continue
            for T, P in TRITON_SHAPES if role == "triton" else SHAPES:
                if T < min_T or (op.full_rank_only and P < T):
                    continue
                if (op.reference_full_rank_only and P < T
                        and test == "test_gram_form_equals_vector_form"):
                    continue
                bug = KNOWN_BUGS.get(test, lambda *a: None)(op, T, P)
                marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
                out.append(pytest.param(op, T, P, role, id=f"{op}-{T}x{P}-{role}", marks=marks))
    return out


def jac(T: int, P: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return make_J(T, P, dtype, seed=1000 * T + P).to(device)


@pytest.mark.parametrize("op,T,P,role", cases(ALL, "test_structure"))
def test_structure(op, T, P, role, device):
    with on_backend(device, role):
        assert_structure(op, jac(T, P, device))


LOW_PRECISION = [pytest.param(op, role, id=f"{op}-{role}") for op in ALL for role in ROLES
                 if role == "native" or op in OPS]   # w is float32 whatever J's dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("op,role", LOW_PRECISION)
def test_structure_low_precision(op, role, dtype, device):
    with on_backend(device, role):
        assert_structure(op, jac(3, 17, device, dtype))


@pytest.mark.parametrize("op,T,P,role", cases(ALL, "test_permutation_equivariant", min_T=2))
def test_permutation_equivariant(op, T, P, role, device):
    with on_backend(device, role):
        assert_permutation_equivariant(op, jac(T, P, device))


@pytest.mark.parametrize("op,T,P,role", cases(ALL, "test_scaling"))
def test_scaling(op, T, P, role, device):
    J = jac(T, P, device)
    with on_backend(device, role):
        for s in SCALES:
            assert_scaling(op, J, abs(s) if op.positive_scales_only else s)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the
# Triton interpreter
@pytest.mark.parametrize("op,T,P,role", cases(ALL, "test_nonfinite_propagates"))
def test_nonfinite_propagates(op, T, P, role, device):
    J = jac(T, P, device)
    with on_backend(device, role), solver_budget(5):
        for value in (math.nan, math.inf):
            assert_nonfinite_propagates(op, J, value)


@pytest.mark.parametrize("op,T,P,role", cases(ALL, "test_gram_form_equals_vector_form"))
def test_gram_form_equals_vector_form(op, T, P, role, device):
    with on_backend(device, role):
        assert_gram_form_equals_vector_form(op, jac(T, P, device))
