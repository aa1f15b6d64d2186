"""Benchmarks of gradops against the implementations in use today (``gradops bench``).

One module per suite, each with a ``main(args) -> int`` that ``gradops bench --suite NAME``
calls; shared pieces in their own modules:

=================  ==============================================================================
``timing``         contenders timed interleaved, round by round; device names; load average
``peers``          the implementations measured against (pair loops, matmuls, TorchJD, numpy)
``models``         the models the suites time (ViT-B/16's encoder, the multi-task MLP)
``report``         rows, Markdown tables, results CSVs with date/device/versions/revision columns
``gram``           suite ``gram``: ``gram`` / ``segment_gram``; the ops suites' table runner
``methods``        suite ``methods``: ``combine`` / ``pcgrad`` / ``graddrop`` (and ``all`` =
                   gram + methods)
``topk``           suite ``topk``: per-neuron top-K masks of ViT-B/16's weights
``sparse``         suite ``sparse``: ``SparseAdamW`` vs dense AdamW
``mtl_steps``      the training steps the ``mtl`` suite times (floor, MTLOptimizer, TorchJD)
``mtl``            suite ``mtl``: one training step per method vs the floor and TorchJD
``mtl_breakdown``  ``--suite mtl --breakdown``: that step split into its stages
``mtl_memory``     ``--suite mtl --memory``: the step's peak memory in copies of ``J``
``trainer``        suite ``trainer``: the bundled trainer's epoch time per method over ``ew``'s
=================  ==============================================================================

``benchmarks/bench_*.py`` (pytest-benchmark) pick a suite's cases from here. See
``docs/benchmarks.md`` for how to run and read them.
"""
from __future__ import annotations

SUITES = ("all", "gram", "methods", "topk", "sparse", "mtl", "trainer")
"""The suites of ``gradops bench --suite``; ``all`` is gram + methods in one table."""

__all__ = ["SUITES"]
