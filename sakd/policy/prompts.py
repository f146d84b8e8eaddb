"""Where the prompts of an on-policy or sequence-level step come from, in the generator's tokens.

``prompts: train`` cuts the first ``prompt_tokens`` tokens of each block the step reads anyway, so the
batch plan (:class:`sakd.data.BatchPlan`) decides the prompts too: a step's prompts do not depend on how it
is split into micro-batches or ranks, a resumed run continues with the next ones, and a ``mixed`` run
reads the data in the same order whichever kind each step is. A prompt file gets a batch plan of its own
over its prompts (same micro-batch, accumulation, world size and seed), advanced by the optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch

from sakd.config import GenerationConfig
from sakd.data import BatchPlan, load_text_dataset
from sakd.data.documents import is_document_mask
from sakd.errors import DataError
from sakd.policy.retokenize import encode, spell


class Prompts:
    """The prompts of each step (or of held-out blocks), as token ids of the generating model.

    Args:
        gcfg: the ``distillation.generation`` section.
        student_tokenizer: the tokenizer of the training blocks.
        generator_tokenizer: the tokenizer of the model that writes (the student's, or the teacher's for
            sequence-level KD).
        retokenize: the generator's tokenizer differs from the student's (prefixes are re-encoded).
        plan: the run's batch plan (micro-batch, accumulation, world size, seed) for a prompt file.
    """

    stop_ids: tuple[int, ...] = ()  # generation stops at EOS only

    def __init__(
        self,
        gcfg: GenerationConfig,
        student_tokenizer: Any,
        generator_tokenizer: Any,
        plan: BatchPlan,
        *,
        retokenize: bool = False,
    ) -> None:
        self.length, self.retokenize = gcfg.prompt_tokens, retokenize
        self.student_tokenizer, self.tokenizer = student_tokenizer, generator_tokenizer
        self.file_ids: list[list[int]] | None = None
        self.plan: BatchPlan | None = None
        if gcfg.prompts != "train":
            texts = list(load_text_dataset(gcfg.prompts, text_field=gcfg.prompt_field)["text"])
            enc = generator_tokenizer(texts, add_special_tokens=False)["input_ids"]
            self.file_ids = [ids[-self.length :] for ids in enc if ids]
            self.plan = BatchPlan(
                num_blocks=len(self.file_ids),
                micro_batch=plan.micro_batch,
                accumulation=plan.accumulation,
                world_size=plan.world_size,
                seed=plan.seed,
            )
            if self.plan.steps_per_epoch == 0:
                raise DataError(
                    f"prompt file {gcfg.prompts} has {len(self.file_ids)} prompts; one optimizer step needs "
                    f"{self.plan.blocks_per_step} (training.batch_size x gradient_accumulation_steps x processes)"
                )

    def from_blocks(self, input_ids: torch.Tensor, documents: torch.Tensor | None = None) -> list[list[int]]:
        """The first ``prompt_tokens`` student tokens of each block, in the generator's tokens; with a
        document mask (``data.packing: within_document``) of one document of the block (see
        :func:`one_document`)."""
        if documents is None:
            prefixes = input_ids[:, : self.length].tolist()
        else:
            eos = self.student_tokenizer.eos_token_id
            prefixes = [
                one_document(r, d, self.length, eos) for r, d in zip(input_ids, documents, strict=True)
            ]
        if not self.retokenize:
            return prefixes
        return [encode(spell(p, self.student_tokenizer).pieces, self.tokenizer).ids for p in prefixes]

    def for_step(
        self, micro_batches: list[dict[str, torch.Tensor]], step: int, rank: int
    ) -> list[tuple[list[list[int]], torch.Tensor]]:
        """Per micro-batch of this rank's step: (prompt ids per row, the rows' sample ids)."""
        if self.file_ids is None:
            return [
                (self.from_blocks(mb["input_ids"], _documents(mb)), mb["sample_ids"]) for mb in micro_batches
            ]
        assert self.plan is not None
        epoch, in_epoch = divmod(step, self.plan.steps_per_epoch)
        out = []
        for idx in self.plan.micro_batches(epoch, in_epoch, rank):
            out.append(([self.file_ids[i] for i in idx], torch.as_tensor(idx, dtype=torch.long)))
        return out


def _documents(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A batch's document mask when its blocks keep documents apart (within_document packing), else None."""
    mask = batch.get("attention_mask")
    return mask if is_document_mask(mask) else None


def one_document(ids: torch.Tensor, documents: torch.Tensor, length: int, eos: int | None) -> list[int]:
    """A prompt of one block that keeps documents apart: the first ``length`` tokens of its first document
    piece with that many tokens before its EOS, else of its longest piece (the first of equals) -- a prompt
    never spans two documents, since the student's attention never does on these blocks."""
    best, best_len = (0, 0), -1
    for doc in documents.unique().tolist():
        if doc <= 0:  # padding
            continue
        at = (documents == doc).nonzero().flatten()
        start, stop = int(at[0]), int(at[-1]) + 1
        if eos is not None and int(ids[stop - 1]) == eos:
            stop -= 1
        if stop - start >= length:
            return ids[start : start + length].tolist()
        if stop - start > best_len:
            best, best_len = (start, stop), stop - start
    return ids[best[0] : best[1]].tolist()
