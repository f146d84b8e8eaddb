"""The terms of the objective, one :class:`~sakd.objective.terms.base.Component` each. This list is the one
place a term is registered: it drives the metric keys, ``needs_teacher``, the curriculum's phases and
balancing, and which teacher signals a run composes with (:mod:`sakd.objective.compose`)."""

from __future__ import annotations

from sakd.config import DistillationConfig
from sakd.objective.terms.attention import Attention
from sakd.objective.terms.base import AuxTerm, Component, ModelShape, Needs, Phase, TermContext
from sakd.objective.terms.contrastive import Contrastive
from sakd.objective.terms.feature import Feature
from sakd.objective.terms.kd import KD

COMPONENTS: tuple[Component, ...] = (KD(), Feature(), Attention(), Contrastive())


def component_weights(d: DistillationConfig) -> dict[str, float]:
    """The configured weight of every key the terms report (what balancing keeps the meaning of)."""
    return {k: w for c in COMPONENTS for k, w in c.weights(d).items()}


def phases() -> dict[str, Phase]:
    """When the curriculum ramps each key in."""
    return {k: c.phase for c in COMPONENTS for k in c.weights(DistillationConfig())}


def active_components(d: DistillationConfig) -> list[Component]:
    """The terms whose own key has a weight > 0 (KD+CE: ``kd``, i.e. ``alpha > 0``)."""
    return [c for c in COMPONENTS if c.weights(d)[c.name] > 0]


def needs_teacher_terms(d: DistillationConfig) -> bool:
    """Whether any term that is on reads the teacher."""
    return any(c.needs.teacher for c in active_components(d))


__all__ = [
    "COMPONENTS",
    "AuxTerm",
    "Component",
    "ModelShape",
    "Needs",
    "Phase",
    "TermContext",
    "active_components",
    "component_weights",
    "needs_teacher_terms",
    "phases",
]
