"""What a loss term of the objective is: a :class:`Component` that declares its name, what it needs from the
teacher signal, when the curriculum ramps it in and its configured weight, and (an auxiliary term) builds the
:class:`AuxTerm` that computes its sum.

Every term is a **sum over the micro-batch's predicted positions** (the trainer divides every sum by the
step's global count of them), so its weight means the same however a step is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from sakd.config import DistillationConfig
from sakd.models.forward import HiddenAndHead

Phase = Literal["start", "structure", "late"]
"""When the curriculum (``distillation.curriculum.phases``) ramps a term in: from the start, from
``structure_start``, from ``all_start``."""


@dataclass(frozen=True)
class Needs:
    """What a term needs from the teacher signal (all False: the student alone)."""

    distribution: bool = False  # its next-token distribution (live logits or a stored one)
    hidden_states: bool = False  # intermediate hidden states or attention maps (a live teacher only)
    router_probs: bool = False  # its MoE routing probabilities

    @property
    def teacher(self) -> bool:
        return self.distribution or self.hidden_states or self.router_probs


@dataclass(frozen=True)
class ModelShape:
    """The sizes a term's projections are built for (from a Hugging Face config)."""

    hidden: int
    layers: int
    heads: int


@dataclass(frozen=True)
class TermContext:
    """What an auxiliary term is built from: both models (a term may switch a kernel on in them), their
    sizes, and whether the two tokenize differently (no one-to-one positions then)."""

    student: nn.Module
    teacher: nn.Module
    student_shape: ModelShape
    teacher_shape: ModelShape
    tokenizers_differ: bool


class AuxTerm(nn.Module):
    """An auxiliary term's trainable projections and its sum (:meth:`loss_sum`). The layers it compares are
    captured from both forwards: ``*_layers`` (``hidden_states`` indices), ``*_attention`` (attention maps)."""

    student_layers: list[int]
    teacher_layers: list[int]
    student_attention: list[int]
    teacher_attention: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.student_layers, self.teacher_layers = [], []
        self.student_attention, self.teacher_attention = [], []

    def loss_sum(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead,
        batch: dict[str, torch.Tensor],
        predicted: torch.Tensor,
    ) -> torch.Tensor:
        """The unweighted term summed over ``predicted`` (``[B, Ls]`` bool) positions."""
        raise NotImplementedError


class Component(Protocol):
    """One term of the objective. ``name`` is its metric key (the sum it reports), its curriculum
    multiplier's key and its ``distillation.<name>`` section."""

    name: str
    needs: Needs
    phase: Phase

    def weights(self, d: DistillationConfig) -> dict[str, float]:
        """The configured weight of each key the term reports (KD+CE: ``kd`` and ``ce``)."""
        ...

    def build(self, d: DistillationConfig, ctx: TermContext) -> AuxTerm | None:
        """The term's module, or None when it is off (KD+CE is the objective's own core: always None)."""
        ...
