"""What a teacher signal can give, as data: the objective, the per-step parts and the composition check
(:mod:`sakd.objective.compose`) read these flags instead of asking which class a signal is.

=====================  ================================================================================
capability             meaning
=====================  ================================================================================
live                   a model runs on every batch (False: a stored signal, an offline cache)
hidden_states          intermediate hidden states and attention maps (the auxiliary terms read them)
router_probs           the MoE router's per-token expert probabilities (the token router's expert signal)
exact_temperature      a stored distribution is exact at this temperature only (None: at any)
scores_new_text        it can score text that is not in the data (on-policy, sequence-level, held-out)
full_distribution      the whole next-token distribution (ULD; dense KD kinds without a sparse mode)
sparse_modes           the ``distillation.loss.sparse`` modes it serves (None: every mode, and none)
routing                ``"ka"`` / ``"sar"``: an MoE teacher routed from outside (None: its own routing)
reads_block_ids        it reads each batch's block ids (``sample_ids``): a cache's rows, KA's seeded draws
=====================  ================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """What a teacher signal can give (module docstring)."""

    live: bool
    hidden_states: bool
    router_probs: bool
    exact_temperature: float | None
    scores_new_text: bool
    full_distribution: bool
    sparse_modes: tuple[str, ...] | None = None
    routing: str | None = None
    reads_block_ids: bool = False

    @property
    def source(self) -> str:
        """How a message names this signal."""
        return "the live teacher" if self.live else "a teacher cache"


def live_capabilities(*, moe: bool, routing: str | None = None) -> Capabilities:
    """A frozen teacher model run on every batch (``moe``: it has routers whose probabilities it returns)."""
    return Capabilities(
        live=True,
        hidden_states=True,
        router_probs=moe,
        exact_temperature=None,
        scores_new_text=True,
        full_distribution=True,
        routing=routing,
        reads_block_ids=routing == "ka",
    )


LIVE = live_capabilities(moe=True)
"""A live teacher as far as the configuration can tell (whether it is an MoE is known once it is loaded)."""


__all__ = ["LIVE", "Capabilities", "live_capabilities"]
