"""The sequence-level contrastive (InfoNCE) term between mean-pooled student and teacher states, projected
into a shared space. A mean over the micro-batch's sequences, weighted by its predicted tokens (so the
trainer's division by the global token count gives a token-weighted mean). Its negatives are the other
sequences *of the same micro-batch on the same rank*, so unlike every other term it depends on how a step is
split (``training.batch_size`` sequences per micro-batch); the run says so at start."""

from __future__ import annotations

import logging

import torch
from torch import nn

from sakd.config import DistillationConfig
from sakd.losses.auxiliary import info_nce, masked_mean_pool
from sakd.models.forward import HiddenAndHead
from sakd.objective.terms.base import AuxTerm, Needs, Phase, TermContext

log = logging.getLogger(__name__)

CONTRASTIVE_SPLIT_NOTE = (
    "distillation.contrastive: InfoNCE negatives are the other sequences of each micro-batch "
    "(training.batch_size per rank), so this term -- unlike the others -- changes with how a step is "
    "split into micro-batches and ranks"
)


class ContrastiveTerm(AuxTerm):
    """``student`` / ``teacher``: ``Linear(student_hidden, D)`` / ``Linear(teacher_hidden, D)`` into a shared
    space (``D = dim`` or the student's hidden size)."""

    def __init__(self, teacher_hidden: int, student_hidden: int, temperature: float, dim: int | None = None):
        super().__init__()
        self.temperature = temperature
        dim = dim or student_hidden
        self.student = nn.Linear(student_hidden, dim)
        self.teacher = nn.Linear(teacher_hidden, dim)

    def pair(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        s_mask: torch.Tensor,
        t_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each side mean-pooled over its own valid positions (the teacher detached) and projected."""
        student = masked_mean_pool(student_hidden, s_mask)
        teacher = masked_mean_pool(teacher_hidden.detach(), t_mask)
        return self.student(student.to(self.student.weight.dtype)), self.teacher(
            teacher.to(self.teacher.weight.dtype)
        )

    def loss_sum(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead,
        batch: dict[str, torch.Tensor],
        predicted: torch.Tensor,
    ) -> torch.Tensor:
        s_mask = batch.get("attention_mask")
        s_mask = torch.ones_like(predicted) if s_mask is None else s_mask.bool()
        t_mask = batch.get("teacher_attention_mask")
        t_mask = s_mask if t_mask is None else t_mask.bool()
        s, t = self.pair(student.hidden, teacher.hidden, s_mask, t_mask)
        return info_nce(s, t, self.temperature) * predicted.sum()


class Contrastive:
    name = "contrastive"
    needs = Needs(hidden_states=True)
    phase: Phase = "late"

    def weights(self, d: DistillationConfig) -> dict[str, float]:
        return {"contrastive": d.contrastive.weight}

    def build(self, d: DistillationConfig, ctx: TermContext) -> AuxTerm | None:
        if not d.contrastive.weight:
            return None
        log.warning(CONTRASTIVE_SPLIT_NOTE)
        return ContrastiveTerm(ctx.teacher_shape.hidden, ctx.student_shape.hidden, d.contrastive.temperature)
