"""The hidden-state feature term: student layer states against projected teacher layer states at the
predicted positions (across tokenizers, at each student position's anchor), averaged over layer pairs."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from sakd.align.positions import gather_at_anchors
from sakd.config import DistillationConfig
from sakd.losses.auxiliary import feature_loss
from sakd.models.forward import HiddenAndHead
from sakd.objective.projections import layer_pairs
from sakd.objective.terms.base import AuxTerm, Needs, Phase, TermContext


class FeatureTerm(AuxTerm):
    """``proj``: one ``Linear(teacher_hidden, student_hidden)`` per ``(teacher layer, student layer)`` pair,
    identity-initialised (zero bias) when the hidden sizes are equal."""

    def __init__(
        self, pairs: list[tuple[int, int]], teacher_hidden: int, student_hidden: int, kind: str
    ) -> None:
        super().__init__()
        self.pairs, self.kind = [(int(t), int(s)) for t, s in pairs], kind
        self.student_layers = [s for _, s in self.pairs]
        self.teacher_layers = [t for t, _ in self.pairs]
        projs = [nn.Linear(teacher_hidden, student_hidden) for _ in self.pairs]
        if teacher_hidden == student_hidden:
            with torch.no_grad():
                for proj in projs:
                    proj.weight.copy_(torch.eye(student_hidden))
                    proj.bias.zero_()
        self.proj = nn.ModuleList(projs)

    def project(self, i: int, teacher_h: torch.Tensor) -> torch.Tensor:
        """Project (detached) teacher hidden states ``[..., Ht]`` of pair ``i`` to ``[..., Hs]``."""
        proj = cast(nn.Linear, self.proj[i])
        return proj(teacher_h.detach().to(proj.weight.dtype))

    def layer_losses(
        self, student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean over the pairs of :func:`~sakd.losses.auxiliary.feature_loss` (each a sum over ``mask``)."""
        total: torch.Tensor | None = None
        for i, (t, s) in enumerate(self.pairs):
            t_state = teacher[t]
            if mask is not None:  # zero masked rows before projecting: no inf·0 in the weight gradient
                t_state = torch.where(mask.unsqueeze(-1), t_state, 0.0)
            loss = feature_loss(student[s], self.project(i, t_state), self.kind, mask)
            total = loss if total is None else total + loss
        if total is None:
            raise ValueError("no feature layer pairs")
        return total / len(self.pairs)

    def loss_sum(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead,
        batch: dict[str, torch.Tensor],
        predicted: torch.Tensor,
    ) -> torch.Tensor:
        if "anchor" in batch:  # teacher states at each student position's anchor
            anchor = batch["anchor"]
            rows = predicted & (anchor >= 0)
            t_layers = {t: gather_at_anchors(layer, anchor) for t, layer in teacher.layers.items()}
        else:
            rows, t_layers = predicted, teacher.layers
        return self.layer_losses(student.layers, t_layers, rows)


class Feature:
    name = "feature"
    needs = Needs(hidden_states=True)
    phase: Phase = "structure"

    def weights(self, d: DistillationConfig) -> dict[str, float]:
        return {"feature": d.feature.weight}

    def build(self, d: DistillationConfig, ctx: TermContext) -> AuxTerm | None:
        if not d.feature.weight:
            return None
        pairs = layer_pairs(
            ctx.teacher_shape.layers, ctx.student_shape.layers, d.feature.layer_map or "uniform"
        )
        return FeatureTerm(pairs, ctx.teacher_shape.hidden, ctx.student_shape.hidden, d.feature.kind)
