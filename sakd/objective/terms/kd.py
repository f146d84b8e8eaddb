"""KD + CE: ``alpha·[T²·]D(teacher ‖ student) + (1 − alpha)·CE``, computed by
:class:`sakd.objective.composite.Objective` itself (fused and chunked; sparse; across tokenizers)."""

from __future__ import annotations

from sakd.config import DistillationConfig
from sakd.objective.terms.base import AuxTerm, Needs, Phase, TermContext


class KD:
    name = "kd"
    needs = Needs(distribution=True)
    phase: Phase = "start"

    def weights(self, d: DistillationConfig) -> dict[str, float]:
        return {"kd": d.loss.alpha, "ce": 1.0 - d.loss.alpha}

    def build(self, d: DistillationConfig, ctx: TermContext) -> AuxTerm | None:
        return None
