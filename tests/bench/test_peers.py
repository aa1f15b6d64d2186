"""The benchmarks' contenders compute what gradops computes (gradops/bench/peers.py, the mtl
suite's steps in gradops/bench/mtl.py), so that the timings compare like with like."""
from __future__ import annotations

import torch

import gradops
from gradops.bench import peers
from gradops.bench.gram import equal_offsets


def test_method_peers_compute_the_same_thing():
    J = torch.randn(3, 500)
    perms = gradops.random_orders(3, generator=torch.Generator().manual_seed(0))
    from gradops.reference import pcgrad_reference
    assert torch.allclose(gradops.pcgrad(J, perms=perms), pcgrad_reference(J, perms), atol=1e-4)
    jd = peers.torchjd_aggregators()
    if jd:  # TorchJD's PCGrad uses its own random orders: T = 2 does not depend on them
        J2 = torch.randn(2, 500)
        assert torch.allclose(jd["pcgrad"](J2), gradops.pcgrad(J2), atol=1e-4)
    assert peers.torch_graddrop(J).shape == (500,)


def test_bench_peers_compute_the_same_thing():
    J = torch.randn(4, 999)
    offsets = equal_offsets(999, 10)
    assert offsets.tolist()[-1] == 999 and len(offsets) == 11
    G = gradops.gram(J)
    for peer in (peers.matmul_gram, peers.pair_loop_gram):
        assert torch.allclose(peer(J), G, atol=1e-4)
    Gl = gradops.segment_gram(J, offsets)
    for peer in (peers.segment_matmul_loop, peers.segment_pair_loop):
        assert torch.allclose(peer(J, offsets), Gl, atol=1e-4)


def test_benchmark_contenders_compute_the_same_step():
    """The mtl suite's floor, batched floor and gradops EW steps move the parameters alike."""
    from gradops.bench import mtl as bm
    s = bm.make_setup(3, width=32, depth=2, batch=8)
    results = []
    for make in (bm.floor_step, bm.batched_floor_step, lambda s: bm.gradops_step(s, "ew")):
        torch.manual_seed(0)
        step = make(s)
        step()
        results.append(torch.cat([p.detach().reshape(-1) for p in step.model.parameters()]))
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[2], results[0])
    assert not torch.equal(results[0], torch.cat([p.detach().reshape(-1)
                                                  for p in s.model.parameters()]))


def test_breakdown_stages_name_what_mtl_optimizer_calls():
    """Every function and method the step breakdown times exists where it is looked up (the
    breakdown skips a missing name, which would drop its stage without a word)."""
    import importlib
    from gradops.bench import mtl_breakdown as bd
    from gradops.optim import MTLOptimizer
    for modname, attr, _ in bd._MODULE_STAGES:
        assert hasattr(importlib.import_module(modname), attr), (modname, attr)
    opt = MTLOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    for path, _ in bd._METHOD_STAGES:
        obj = opt
        for name in path.split("."):
            assert hasattr(obj, name), path
            obj = getattr(obj, name)
