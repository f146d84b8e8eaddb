"""The auxiliary terms of a run (feature, attention, contrastive, and any other registered in
:mod:`sakd.objective.terms`) added to the logit loss with their configured weights and the curriculum's
multipliers. Each is a sum over the **same predicted positions** as KD and CE (the trainer divides every sum
by the step's global count of them); see each term's module for what it compares.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from sakd.config import DistillationConfig
from sakd.models.forward import HiddenAndHead
from sakd.objective import terms as registry
from sakd.objective.terms import AuxTerm, ModelShape, TermContext


class AuxTerms(nn.Module):
    """The built auxiliary terms (``terms``: name -> :class:`~sakd.objective.terms.AuxTerm`, in registry
    order) and their weights. Its parameters are the terms' projections: they train with the student, are
    checkpointed with it, and are never exported."""

    def __init__(self, terms: dict[str, AuxTerm], weights: dict[str, float]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    def _union(self, attr: str) -> list[int]:
        return sorted({i for term in self.terms.values() for i in getattr(term, attr)})

    @property
    def student_layers(self) -> list[int]:
        return self._union("student_layers")

    @property
    def teacher_layers(self) -> list[int]:
        return self._union("teacher_layers")

    @property
    def student_attention(self) -> list[int]:
        return self._union("student_attention")

    @property
    def teacher_attention(self) -> list[int]:
        return self._union("teacher_attention")

    def add_to(
        self,
        student: HiddenAndHead,
        teacher: HiddenAndHead,
        batch: dict[str, torch.Tensor],
        predicted: torch.Tensor,
        loss: torch.Tensor,
        sums: dict[str, torch.Tensor],
        multipliers: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss`` plus the weighted terms, and ``sums`` with each term's detached (unweighted) sum added.

        ``predicted``: ``[B, Ls]`` bool, the positions KD and CE are summed over; ``multipliers``: the
        curriculum's factor per term (absent: 1).
        """
        sums, mult = dict(sums), multipliers or {}
        for name, module in self.terms.items():
            value = cast(AuxTerm, module).loss_sum(student, teacher, batch, predicted)
            loss = loss + self.weights[name] * mult.get(name, 1.0) * value
            sums[name] = value.detach()
        sums["loss"] = loss.detach()
        return loss, sums


def _shape(config: object) -> ModelShape:
    return ModelShape(
        hidden=int(config.hidden_size),  # type: ignore[attr-defined]
        layers=int(config.num_hidden_layers),  # type: ignore[attr-defined]
        heads=int(config.num_attention_heads),  # type: ignore[attr-defined]
    )


def build_aux_terms(
    d: DistillationConfig, student: nn.Module, teacher: nn.Module | None, tokenizers_differ: bool
) -> AuxTerms | None:
    """The auxiliary terms that are on, with their projections (built in registry order), or None when none
    is (or there is no teacher model to compare with)."""
    if teacher is None:
        return None
    t_model = getattr(teacher, "module", teacher)  # a ZeRO-3 engine has a `config` of its own
    ctx = TermContext(student, t_model, _shape(student.config), _shape(t_model.config), tokenizers_differ)
    terms, weights = {}, {}
    for component in registry.COMPONENTS:
        term = component.build(d, ctx)
        if term is not None:
            terms[component.name] = term
            weights[component.name] = component.weights(d)[component.name]
    if not terms:
        return None
    return AuxTerms(terms, weights)
