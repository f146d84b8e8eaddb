"""Which parts of a run compose with which teacher signal, decided from declarations: what each loss term
needs (:mod:`sakd.objective.terms`) and what the signal can give
(:class:`~sakd.teacher.capabilities.Capabilities`). A combination is refused only where the signal cannot
exist, in one line that says why; everything else composes.

:func:`check_composition` runs when a run is built (``sakd distill``, :class:`~sakd.integrations.
DistillationTrainer`), once the teacher signal's capabilities are known (a cache's from its manifest).
"""

from __future__ import annotations

from sakd.config import RunConfig
from sakd.errors import ConfigError
from sakd.objective.terms import active_components
from sakd.teacher.capabilities import Capabilities


def _signals(teacher: Capabilities) -> tuple[tuple[str, str, bool], ...]:
    """(a :class:`~sakd.objective.terms.Needs` field, what it names, whether ``teacher`` gives it) for the
    needs besides hidden states: a next-token distribution (live logits, or a stored one in some sparse
    mode) and the MoE router's probabilities (an MoE teacher, or a cache made with them)."""
    distribution = teacher.full_distribution or bool(teacher.sparse_modes)
    return (
        ("distribution", "next-token distribution", distribution),
        ("router_probs", "router probabilities", teacher.router_probs),
    )


def check_composition(cfg: RunConfig, teacher: Capabilities) -> list[str]:
    """Refuse what ``teacher`` cannot give to ``cfg``'s parts (a one-line :class:`ConfigError` each); returns
    notes on what runs without a signal it would use when present."""
    d, loss, notes = cfg.distillation, cfg.distillation.loss, []
    source = teacher.source
    for c in active_components(d):
        if c.needs.hidden_states and not teacher.hidden_states:
            raise ConfigError(
                f"distillation.{c.name} needs the teacher's hidden states, which {source} does not hold; set "
                f"distillation.{c.name}.weight=0 or train with the live teacher"
            )
        for need, what, has in _signals(teacher):
            if getattr(c.needs, need) and not has:
                raise ConfigError(
                    f"distillation.{c.name} needs the teacher's {what}, which {source} does not hold: turn "
                    f"distillation.{c.name} off or use a teacher signal that gives it"
                )
    if d.alignment.uld_weight > 0 and not teacher.full_distribution:
        raise ConfigError(
            f"distillation.alignment.uld_weight needs the full teacher distribution, which {source} does not "
            "hold; set it to 0"
        )
    exact = teacher.exact_temperature
    if exact is not None and (loss.temperature_schedule != "constant" or loss.temperature != exact):
        raise ConfigError(
            f"distillation.loss.temperature={loss.temperature} ({loss.temperature_schedule}) differs from the "
            f"cache's {exact}: a stored distribution is exact only at the temperature it was made at; set "
            f"distillation.loss.temperature={exact} (constant) or regenerate the cache"
        )
    if teacher.sparse_modes is not None and loss.sparse not in teacher.sparse_modes:
        raise ConfigError(
            f"distillation.loss.sparse={loss.sparse} cannot use {source}, which serves "
            + " or ".join(teacher.sparse_modes)
        )
    if d.policy != "off" and not teacher.scores_new_text:
        raise ConfigError(
            f"distillation.policy={d.policy} trains on text written during training, which {source} cannot "
            "score (it holds the data's text only): turn one of them off"
        )
    if d.moe.student_aware_router and not teacher.live:
        raise ConfigError(
            f"distillation.moe.student_aware_router trains the live teacher's router, which {source} does not "
            "run: turn one of them off"
        )
    if d.moe.augment_samples and not teacher.live:
        raise ConfigError(
            f"distillation.moe.augment_samples re-routes the live teacher's experts, which {source} does not "
            "run (it stores one routing): turn one of them off"
        )
    if d.router.enabled and d.router.expert > 0 and not teacher.router_probs:
        notes.append(
            f"distillation.router: {source} gives no router probabilities, so the expert signal is off "
            + (
                "(make the cache with distillation.cache.router=true)"
                if not teacher.live
                else "(dense teacher)"
            )
        )
    return notes


__all__ = ["check_composition"]
