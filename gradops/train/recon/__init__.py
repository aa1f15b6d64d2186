"""Recon (Shi et al., "Recon: Reducing Conflicting Gradients from the Root for Multi-Task Learning",
ICLR 2023): the layer search (:func:`search_layers`; its run directory:
:func:`gradops.train.runs.recon_search.recon_search`), branching of any encoder
(:class:`BranchedEncoder`, :func:`branch_model`, :func:`branch_report`), the before/after conflict
table (:func:`conflict_table`; over seeds with the paired change and a verdict on Recon's claim:
:mod:`gradops.train.report.recon_seeds`) and the cost of the search against the published pair loop
(:func:`bench_search_cost`). See docs/recon.md.
"""
from __future__ import annotations

from ..models.branch import (BranchedEncoder, BranchedMTLModel, branch_model, branch_report,
                             layer_names)
from .scores import (TABLE6_BINS, CosineBins, LayerScores, bench_search_cost, fused_scores,
                     pair_loop_scores)
from .search import (conflict_table, conflict_table_markdown, read_ranking, search_layers,
                     top_layers)

__all__ = ["BranchedEncoder", "BranchedMTLModel", "CosineBins", "LayerScores", "TABLE6_BINS",
           "bench_search_cost", "branch_model", "branch_report", "conflict_table",
           "conflict_table_markdown", "fused_scores", "layer_names", "pair_loop_scores",
           "read_ranking", "search_layers", "top_layers"]
