"""The packed train and held-out blocks of a run (:class:`DataBundle`, built by :func:`prepare_data`) and
how a list of block indices becomes a model batch."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from sakd.config import DataConfig
from sakd.data.packing import pack, pack_pair
from sakd.data.text import load_text_dataset
from sakd.errors import DataError


@dataclass
class DataBundle:
    """Packed train and held-out blocks (``input_ids`` columns, torch format).

    With a teacher tokenizer that differs from the student's, the blocks also hold the teacher's
    tokens of the same text and the alignment (see :func:`pack_pair`); teacher sequences are
    right-padded to ``teacher_block_size`` (the longest of any block) with ``teacher_pad_id``.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    block_size: int
    teacher_block_size: int | None = None
    teacher_pad_id: int = 0

    @property
    def aligned(self) -> bool:
        return self.teacher_block_size is not None

    def batch(self, blocks: datasets.Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = blocks[indices]
        out = make_batch(rows["input_ids"], indices)
        if self.aligned:
            out.update(self.teacher_fields(rows))
        return out

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.batch(self.train, indices)

    def teacher_fields(self, rows: dict) -> dict[str, torch.Tensor]:
        """Padded teacher ids + mask and the alignment tensors of a set of rows."""
        seqs = rows["teacher_input_ids"]
        n, lt = len(seqs), self.teacher_block_size
        ids = torch.full((n, lt), self.teacher_pad_id, dtype=torch.long)
        mask = torch.zeros((n, lt), dtype=torch.long)
        for i, seq in enumerate(seqs):
            seq = torch.as_tensor(seq, dtype=torch.long)
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        return {
            "teacher_input_ids": ids,
            "teacher_attention_mask": mask,
            "anchor": torch.stack([torch.as_tensor(a, dtype=torch.long) for a in rows["anchor"]]),
            "span_end": torch.stack([torch.as_tensor(a, dtype=torch.long) for a in rows["span_end"]]),
        }


def make_batch(input_ids: torch.Tensor, sample_ids: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """A model batch from packed blocks; labels equal inputs (the loss shifts them)."""
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        "sample_ids": torch.as_tensor(sample_ids, dtype=torch.long),
    }


def split_documents(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and held-out documents of ``cfg`` (a ``text`` column each): ``data.eval`` when given,
    else ``eval_fraction`` of the documents, drawn with ``seed``. An offline teacher cache covers exactly
    the training documents, so it calls this too."""
    if not cfg.train:
        raise DataError("no training data: set data.train to a .txt/.jsonl/.parquet file or a dataset name")
    docs = load_text_dataset(
        cfg.train, split=cfg.split, text_field=cfg.text_field, dataset_config=cfg.dataset_config
    )
    if len(docs) == 0:
        raise DataError(f"data {cfg.train} holds no non-empty documents")
    if cfg.eval:
        eval_docs = load_text_dataset(
            cfg.eval, split=cfg.eval_split, text_field=cfg.text_field, dataset_config=cfg.dataset_config
        )
        return docs, eval_docs
    if len(docs) < 2:
        raise DataError(f"data {cfg.train} has 1 document; a held-out split needs more (or set data.eval)")
    split = docs.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
    return split["train"], split["test"]


def prepare_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> DataBundle:
    """Load, split (by document), tokenize and pack the corpus described by ``cfg``.

    With ``teacher_tokenizer`` the blocks also carry the teacher's tokens and the alignment.
    """
    train_docs, eval_docs = split_documents(cfg, seed)
    if teacher_tokenizer is None:
        train = pack(train_docs, tokenizer, cfg.block_size)
        evalset = pack(eval_docs, tokenizer, cfg.block_size)
    else:
        train = pack_pair(train_docs, tokenizer, teacher_tokenizer, cfg.block_size)
        evalset = pack_pair(eval_docs, tokenizer, teacher_tokenizer, cfg.block_size)
    for name, blocks in (("training", train), ("held-out", evalset)):
        if len(blocks) == 0:
            raise DataError(
                f"{name} text of {cfg.train if name == 'training' else (cfg.eval or cfg.train)} is shorter than one "
                f"block of {cfg.block_size} tokens; add text or lower data.block_size"
            )
    if cfg.max_train_blocks:
        train = train.select(range(min(cfg.max_train_blocks, len(train))))
    if cfg.max_eval_blocks:
        evalset = evalset.select(range(min(cfg.max_eval_blocks, len(evalset))))
    if teacher_tokenizer is None:
        return DataBundle(train.with_format("torch"), evalset.with_format("torch"), cfg.block_size)
    longest = max(max(part[:]["teacher_length"]) for part in (train, evalset))
    pad = teacher_tokenizer.pad_token_id
    pad = teacher_tokenizer.eos_token_id if pad is None else pad
    return DataBundle(
        train, evalset, cfg.block_size, teacher_block_size=max(longest, 1), teacher_pad_id=pad or 0
    )
