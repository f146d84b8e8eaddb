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
from sakd.data import DataBundle, prepare_data

SAMPLE_ID = "sample_id"
"""The column holding each row's block id: its index in the packed training (or held-out) blocks, what
``sakd distill`` calls a sample id. It keys Knowledge Augmentation's draws and a teacher cache's blocks."""


def with_sample_ids(blocks: datasets.Dataset) -> datasets.Dataset:
    """``blocks`` with a :data:`SAMPLE_ID` column: each row's index in ``blocks``."""
    fmt = blocks.format
    out = blocks.add_column(SAMPLE_ID, list(range(len(blocks))))
    return out.with_format(fmt["type"]) if fmt["type"] else out


class DistillationCollator:
    """Rows of packed blocks -> a batch: ``input_ids``, ``attention_mask``, ``labels`` (the loss shifts
    them), ``sample_ids`` (the rows' :data:`SAMPLE_ID`, when they carry one), and, for aligned data,
    ``teacher_input_ids`` / ``teacher_attention_mask`` (right-padded to the bundle's longest teacher
    block) with ``anchor`` / ``span_end``.

    ``data_config`` and ``seed``: the ``data`` section and the seed the blocks were prepared with (set by
    :func:`prepare_distillation_data`); a :class:`~sakd.integrations.DistillationTrainer` reads them to take
    the conversations' path under ``distillation.policy`` and in the alignment, as ``sakd distill`` does."""

    def __init__(self, bundle: DataBundle, data_config: DataConfig | None = None, seed: int = 0) -> None:
        self.bundle, self.data_config, self.seed = bundle, data_config, seed

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = {k: [f[k] for f in features] for k in features[0]}
        ids = rows.get(SAMPLE_ID)
        # the same batch as sakd distill's: a packing EOS is never a target, documents stay apart when packed so
        batch = self.bundle.rows_batch(rows, [int(i) for i in ids] if ids is not None else [])
        if ids is None:  # no block ids: Knowledge Augmentation and a teacher cache refuse such batches
            del batch["sample_ids"]
        return batch


@dataclass
class DistillationData:
    """Train and held-out blocks (each row with its block id, :data:`SAMPLE_ID`) and their collator, ready
    for ``Trainer(train_dataset=..., eval_dataset=..., data_collator=...)``."""

    train: datasets.Dataset
    eval: datasets.Dataset
    collator: DistillationCollator


def prepare_distillation_data(
    data: DataConfig | dict, tokenizer: Any, teacher_tokenizer: Any = None, *, seed: int = 0
) -> DistillationData:
    """sakd's ``data`` section (a dict is validated like a recipe's) tokenized and packed for the student,
    and -- when ``teacher_tokenizer`` has another vocabulary, or (conversations) another chat template --
    aligned with the teacher's tokens, as ``sakd distill`` pairs them. ``seed``: the held-out split's, which
    ``sakd distill`` takes from ``training.seed``; under ``distillation.policy`` over conversations it must
    be ``TrainingArguments.seed``."""
    if not isinstance(data, DataConfig):
        data = load_config({"data": data})[0].data
    paired = teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab()
    if teacher_tokenizer is not None and data.format == "chat":  # each model reads its own template
        paired = paired or getattr(teacher_tokenizer, "chat_template", None) != tokenizer.chat_template
    bundle = prepare_data(data, tokenizer, seed, teacher_tokenizer if paired else None)
    return DistillationData(
        with_sample_ids(bundle.train), with_sample_ids(bundle.eval), DistillationCollator(bundle, data, seed)
    )
