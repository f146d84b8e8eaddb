"""The data a :class:`~sakd.integrations.DistillationTrainer` reads: packed blocks from sakd's own data
preparation (:func:`sakd.data.prepare_data`: documents -> tokens -> blocks; with a teacher tokenizer that
differs, the teacher's tokens of the same text and the character-span alignment), and the collator that
turns rows of them into the batches the objective takes (what ``sakd distill`` feeds its steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch

from sakd.config import DataConfig, load_config
from sakd.data import DataBundle, make_batch, prepare_data


class DistillationCollator:
    """Rows of packed blocks -> a batch: ``input_ids``, ``attention_mask``, ``labels`` (the loss shifts
    them) and, for aligned data, ``teacher_input_ids`` / ``teacher_attention_mask`` (right-padded to the
    bundle's longest teacher block) with ``anchor`` / ``span_end``."""

    def __init__(self, bundle: DataBundle) -> None:
        self.bundle = bundle

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = {k: [f[k] for f in features] for k in features[0]}
        batch = make_batch(
            torch.stack([torch.as_tensor(x) for x in rows["input_ids"]]),
            list(range(len(features))),
            eos_id=self.bundle.eos_id,  # a packing EOS is never a target, as in sakd distill
        )
        del batch["sample_ids"]  # the Trainer's sampler, not sakd's batch plan, decides the order
        if self.bundle.aligned:
            batch.update(self.bundle.teacher_fields(rows))
        return batch


@dataclass
class DistillationData:
    """Train and held-out blocks and their collator, ready for ``Trainer(train_dataset=..., eval_dataset=...,
    data_collator=...)``."""

    train: datasets.Dataset
    eval: datasets.Dataset
    collator: DistillationCollator


def prepare_distillation_data(
    data: DataConfig | dict, tokenizer: Any, teacher_tokenizer: Any = None, *, seed: int = 0
) -> DistillationData:
    """sakd's ``data`` section (a dict is validated like a recipe's) tokenized and packed for the student,
    and -- when ``teacher_tokenizer`` has another vocabulary -- aligned with the teacher's tokens."""
    if not isinstance(data, DataConfig):
        data = load_config({"data": data})[0].data
    differ = teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab()
    bundle = prepare_data(data, tokenizer, seed, teacher_tokenizer if differ else None)
    return DistillationData(bundle.train, bundle.eval, DistillationCollator(bundle))
