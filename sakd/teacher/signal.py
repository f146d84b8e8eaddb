"""The teacher signal the objective consumes, behind one interface (:class:`TeacherSignal`):
``signal(batch) -> teacher output``, and what it can give (:class:`~sakd.teacher.capabilities.Capabilities`).

:class:`OnlineTeacher` runs the frozen teacher (replicated, quantized, or a ZeRO-3 engine) on each batch
-- on its own tokens when the tokenizers differ -- and returns its final hidden states, output head,
router probabilities (MoE) and whatever internals the auxiliary terms asked for (:class:`HiddenAndHead`).
:class:`CachedTeacher` reads an offline cache instead (``sakd cache-teacher``; no teacher in memory) and
returns the stored sparse distribution at every student position (:class:`StoredSignal`).
:class:`sakd.teacher.routed.RoutedTeacher` is the live MoE teacher routed from outside (Knowledge Augmentation,
the Student-Aware Router). :func:`sakd.training.builders.build_teacher_signal` makes the run's one signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

import torch
from torch import nn

from sakd.losses import SparseTeacher
from sakd.models.forward import HiddenAndHead, hidden_and_head
from sakd.teacher.cache.lookup import aligned_fields, same_block_fields, stored_sparse
from sakd.teacher.cache.manifest import SignalSpec
from sakd.teacher.cache.reader import CacheReader
from sakd.teacher.capabilities import Capabilities, live_capabilities
from sakd.teacher.moe import routers

Batch: TypeAlias = dict[str, torch.Tensor]

# the sparse loss modes each stored mode serves; the first is used when distillation.loss.sparse is none
LOSS_MODES = {"topk": ("subset", "topk_tail"), "topk_tail": ("topk_tail", "subset"), "sampled": ("sampled",)}


class OnlineTeacher:
    """A frozen teacher model run on every batch, without gradients."""

    def __init__(
        self,
        model: nn.Module,
        *,
        aligned: bool,
        hidden_layers: Sequence[int] = (),
        attention_layers: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.aligned = aligned  # batches carry the teacher's own tokens (teacher_input_ids)
        self.hidden_layers = list(hidden_layers)
        self.attention_layers = sorted(set(attention_layers))
        self.capabilities = live_capabilities(moe=bool(routers(model)))

    def at_step(self, step: int) -> None:
        """Nothing depends on the step here."""

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's own tokens of ``batch`` (its tokenization when the tokenizers differ)."""
        if self.aligned:
            return batch["teacher_input_ids"], batch["teacher_attention_mask"]
        return batch["input_ids"], batch["attention_mask"]

    def __call__(self, batch: Batch) -> HiddenAndHead:
        ids, mask = self.inputs(batch)
        with torch.no_grad():
            return hidden_and_head(
                self.model,
                self.model,
                ids,
                mask,
                router=True,
                hidden_layers=self.hidden_layers,
                attention_layers=self.attention_layers,
            )


@dataclass
class StoredSignal:
    """A cached teacher's signal at each student position of a batch.

    Attributes:
        sparse: ``[B, L, S]`` the stored ids / log-probs (+ counts or tail) at each student position's
            teacher position (rows where ``kd_mask`` is False hold anything).
        kd_mask: ``[B, L]`` bool, where a teacher position is anchored (None: everywhere, same blocks).
        target_logprob: ``[B, L]`` the teacher's chain-rule log-prob of the next student token's text where
            the teacher spells it with several tokens, else NaN (across tokenizers; else None).
        router: ``[B, L, layers, experts]`` the MoE router's probabilities, when the cache stores them.
    """

    sparse: SparseTeacher
    kd_mask: torch.Tensor | None = None
    target_logprob: torch.Tensor | None = None
    router: torch.Tensor | None = None


TeacherOutput: TypeAlias = HiddenAndHead | StoredSignal
"""One micro-batch's teacher signal: a live forward's states and head, or a stored distribution."""


@runtime_checkable
class TeacherSignal(Protocol):
    """The teacher signal of a run: what it can give, and its output for a batch."""

    @property
    def capabilities(self) -> Capabilities: ...

    def at_step(self, step: int) -> None:
        """Called before each optimizer step (Knowledge Augmentation seeds its draws with it)."""

    def __call__(self, batch: Batch) -> TeacherOutput: ...


def stored_capabilities(spec: SignalSpec) -> Capabilities:
    """What a cache made as ``spec`` says can give: its stored distribution, exact at its temperature, in the
    sparse modes its stored mode serves, and the router's probabilities when it stores them."""
    return Capabilities(
        live=False,
        hidden_states=False,
        router_probs=spec.router_shape is not None,
        exact_temperature=spec.temperature,
        scores_new_text=False,
        full_distribution=False,
        sparse_modes=LOSS_MODES[spec.mode],
        reads_block_ids=True,
    )


class CachedTeacher:
    """The teacher signal of a batch, read from a cache by the batch's block ids (``sample_ids``), so it
    follows the batch plan under any micro-batch x accumulation x rank split and across resume.

    ``index`` is None when the student reads the cache's own blocks, else the aligned per-block index
    (:func:`sakd.teacher.cache.lookup.aligned_index`); ``top_k`` keeps only the best ``top_k`` stored ids.
    """

    def __init__(
        self, reader: CacheReader, index: Any, *, top_k: int | None, chain_rule: bool, device: torch.device
    ) -> None:
        self.reader, self.index, self.top_k = reader, index, top_k
        self.chain_rule, self.device = chain_rule, device
        self.capabilities = stored_capabilities(reader.spec)

    def at_step(self, step: int) -> None:
        """A block's stored signal does not depend on the step."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> StoredSignal:
        ids = batch["sample_ids"].reshape(-1).tolist()
        kd_mask = chain = None
        if self.index is None:
            fields = same_block_fields(self.reader, batch["sample_ids"].reshape(-1), batch["input_ids"])
            kd_mask = fields.get("kept")  # positions=kd: only the stored positions (all that carry KD)
        else:
            fields, kd_mask, chain = aligned_fields(self.reader, self.index[ids], self.chain_rule)
        sparse = stored_sparse(fields, self.reader.spec.temperature, self.top_k)
        dev, router = self.device, fields.get("router")
        return StoredSignal(
            sparse=SparseTeacher(
                sparse.indices.to(dev),
                sparse.logprobs.to(dev),
                sparse.temperature,
                None if sparse.counts is None else sparse.counts.to(dev),
                None if sparse.tail_logprob is None else sparse.tail_logprob.to(dev),
            ),
            kd_mask=None if kd_mask is None else kd_mask.to(dev),
            target_logprob=None if chain is None else chain.to(dev),
            router=None if router is None else router.to(dev),
        )
