"""The bundled trainer's modes that are not optimizer methods: single-task learning (one model
per task, the baseline of Δm%) and selective task-group updates."""
from __future__ import annotations

from ._registry import TrainerMode, register

__all__ = ["STL", "Selective"]


@register
class STL(TrainerMode):
    """Single-task learning: one model per task, trained on the sum of their losses (each model
    sees only its task's loss). The baseline of Δm%."""

    name = "stl"
    display = "STL"
    paper = "single-task learning, the baseline of every MTL paper"
    order = 0


@register
class Selective(TrainerMode):
    """Selective task-group updates with proximal inter-task affinity: each batch updates the
    shared parameters group by group (``--selective-decay``, ``--selective-warmup``)."""

    name = "selective"
    display = "Selective"
    paper = ("Jeong & Yoon, Selective Task Group Updates for Multi-Task Optimization, "
             "ICLR 2025")
    order = 10
