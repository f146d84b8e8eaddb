"""Attention transfer: the student's attention maps of chosen layers against the teacher's (its heads
projected onto the student's), summed over the predicted query rows and averaged over the layer pairs.
One-to-one positions only: with two tokenizers the term is off (a warning says so)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from sakd.config import DistillationConfig
from sakd.errors import ConfigError
from sakd.losses.auxiliary import attention_transfer_loss
from sakd.models.capture import enable_selective_attention
from sakd.models.forward import HiddenAndHead
from sakd.objective.projections import group_average_init
from sakd.objective.terms.base import AuxTerm, Needs, Phase, TermContext

log = logging.getLogger(__name__)


class AttentionTerm(AuxTerm):
    """``proj``: ``Linear(teacher_heads, student_heads, bias=False)`` on the head axis, group-average
    initialised; ``pairs``: the (student, teacher) layers whose maps are matched."""

    def __init__(self, pairs: list[tuple[int, int]], teacher_heads: int, student_heads: int) -> None:
        super().__init__()
        self.pairs = pairs
        self.student_attention = sorted({s for s, _ in pairs})
        self.teacher_attention = sorted({t for _, t in pairs})
        self.proj = nn.Linear(teacher_heads, student_heads, bias=False)
        group_average_init(self.proj.weight)

    def loss_sum(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead,
        batch: dict[str, torch.Tensor],
        predicted: torch.Tensor,
    ) -> torch.Tensor:
        total: torch.Tensor | None = None
        for s, t in self.pairs:
            loss = attention_transfer_loss(student.attentions[s], teacher.attentions[t], self.proj, predicted)
            total = loss if total is None else total + loss
        if total is None:
            raise ValueError("no attention layer pairs")
        return total / len(self.pairs)


class Attention:
    name = "attention"
    needs = Needs(hidden_states=True)
    phase: Phase = "structure"

    def weights(self, d: DistillationConfig) -> dict[str, float]:
        return {"attention": d.attention.weight}

    def build(self, d: DistillationConfig, ctx: TermContext) -> AuxTerm | None:
        if not d.attention.weight:
            return None
        if ctx.tokenizers_differ:
            log.warning(
                "distillation.attention is disabled: teacher and student tokenize differently, so their "
                "attention maps have different shapes and no one-to-one positions"
            )
            return None
        ls, lt = ctx.student_shape.layers, ctx.teacher_shape.layers
        pairs = []
        for layer in d.attention.layers:
            s_layer = layer + ls if layer < 0 else layer
            if not 0 <= s_layer < ls:
                raise ConfigError(
                    f"distillation.attention.layers: student layer {layer} is out of range for {ls} layers"
                )
            pairs.append((s_layer, max(0, round((s_layer + 1) * lt / ls) - 1)))
        term = AttentionTerm(pairs, ctx.teacher_shape.heads, ctx.student_shape.heads)
        enable_selective_attention(ctx.student, term.student_attention)
        enable_selective_attention(ctx.teacher, term.teacher_attention)
        return term
