"""The packed train and held-out blocks of a run (:class:`DataBundle`, built by :func:`prepare_data`) and
how a list of block indices becomes a model batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from sakd.config import DataConfig
from sakd.data.chat import load_conversations, tokenize_conversations
from sakd.data.chat_pair import tokenize_conversation_pairs
from sakd.data.documents import document_mask
from sakd.data.packing import pack, pack_pair
from sakd.data.stream import TokenStream
from sakd.data.text import load_text_dataset
from sakd.errors import DataError

IGNORE_INDEX = -100  # the label of a position that is not a target (transformers' convention)


@dataclass
class DataBundle:
    """Packed train and held-out blocks (``input_ids`` columns, torch format).

    With a teacher tokenizer that differs from the student's, the blocks also hold the teacher's
    tokens of the same text and the alignment (see :func:`pack_pair`); teacher sequences are
    right-padded to ``teacher_block_size`` (the longest of any block) with ``teacher_pad_id``.
    Held-out blocks also hold ``byte_counts`` (bits per byte). ``eos_id`` is the EOS that packing puts
    after every document: predicting it is never scored (:func:`make_batch`, :meth:`heldout`).
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    block_size: int
    teacher_block_size: int | None = None
    teacher_pad_id: int = 0
    eos_id: int | None = None
    documents: tuple[int, int] = (0, 0)  # training and held-out documents the blocks were cut from

    @property
    def aligned(self) -> bool:
        return self.teacher_block_size is not None

    def describe(self, sample_by: str) -> str:
        """One line on how the text was split, for the run's log."""
        return (
            f"data: {self.documents[0]:,} training / {self.documents[1]:,} held-out documents "
            f"(data.sample_by={sample_by}), {len(self.train):,} training blocks of {self.block_size} tokens"
        )

    def batch(self, blocks: datasets.Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.rows_batch(blocks[indices], indices)

    def rows_batch(self, rows: dict, sample_ids: list[int]) -> dict[str, torch.Tensor]:
        """The model batch of a set of packed rows (column -> list): :func:`make_batch` on their
        ``input_ids`` (+ ``position``, ``target`` when packed so), plus the teacher's fields when aligned."""

        def column(name: str) -> torch.Tensor | None:
            return _stack(rows[name]) if name in rows else None

        out = make_batch(
            _stack(rows["input_ids"]),
            sample_ids,
            eos_id=self.eos_id,
            positions=column("position"),
            targets=column("target"),
        )
        if self.aligned:
            out.update(self.teacher_fields(rows))
        return out

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.batch(self.train, indices)

    def heldout(self) -> TokenStream:
        """The held-out blocks as one token stream (what :func:`sakd.evaluation.heldout.evaluate` scores)."""
        return TokenStream.from_blocks(self.eval, self.eos_id)

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
            if "teacher_position" in rows and len(seq):  # within_document: the teacher's document mask
                mask[i, : len(seq)] = document_mask(_stack([rows["teacher_position"][i]]))[0]
        return {
            "teacher_input_ids": ids,
            "teacher_attention_mask": mask,
            "anchor": torch.stack([torch.as_tensor(a, dtype=torch.long) for a in rows["anchor"]]),
            "span_end": torch.stack([torch.as_tensor(a, dtype=torch.long) for a in rows["span_end"]]),
        }


def _stack(rows: Any) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.long()
    return torch.stack([torch.as_tensor(r, dtype=torch.long) for r in rows])


def make_batch(
    input_ids: torch.Tensor,
    sample_ids: list[int] | torch.Tensor,
    *,
    eos_id: int | None = None,
    positions: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A model batch from packed blocks; labels equal inputs (the loss shifts them), except where a token
    is not a target (label -100): the EOS packing put after each document (``eos_id``), or -- with
    ``targets`` (conversations, :mod:`sakd.data.chat`) -- every token whose ``targets`` entry is 0.

    With ``positions`` (each token's index inside its document: within-document packing) the attention
    mask is the document mask of :mod:`sakd.data.documents`, and a document's first token is not a target:
    no earlier token of its document predicts it, just as when the document runs alone."""
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    labels = input_ids.clone()
    if targets is not None:
        labels[torch.as_tensor(targets) == 0] = IGNORE_INDEX
    elif eos_id is not None:
        labels[input_ids == eos_id] = IGNORE_INDEX
    mask = torch.ones_like(input_ids)
    if positions is not None:
        positions = torch.as_tensor(positions, dtype=torch.long)
        labels[positions == 0] = IGNORE_INDEX
        mask = document_mask(positions)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "sample_ids": torch.as_tensor(sample_ids, dtype=torch.long),
    }


def _split_one_document(text: str, fraction: float) -> tuple[str, str]:
    """A single document split in two by characters: the held-out part is its last ``fraction``, starting
    after the last line break or space before that point (no word is cut); both tokenizers of a pair see
    the same split."""
    cut = int(len(text) * (1 - fraction))
    at = max(text.rfind("\n", 0, cut), text.rfind(" ", 0, cut))
    return (text[: at + 1], text[at + 1 :]) if at > 0 else (text[:cut], text[cut:])


def split_documents(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and held-out documents of ``cfg``: ``data.eval``, else ``eval_fraction`` of the
    documents (shuffled with ``seed``), else -- a corpus of one document -- its last ``eval_fraction``.
    An offline teacher cache covers exactly the training documents, so it calls this too."""
    if not cfg.train:
        raise DataError("no training data: set data.train to a .txt/.jsonl/.parquet file or a dataset name")
    if cfg.format == "chat":
        opts = {"messages_field": cfg.messages_field, "dataset_config": cfg.dataset_config}
        load = load_conversations
    else:
        opts = {
            "text_field": cfg.text_field,
            "dataset_config": cfg.dataset_config,
            "sample_by": cfg.sample_by,
        }
        load = load_text_dataset
    docs = load(cfg.train, split=cfg.split, **opts)
    if len(docs) == 0:
        raise DataError(f"data {cfg.train} holds no non-empty documents")
    if cfg.eval:
        return docs, load(cfg.eval, split=cfg.eval_split, **opts)
    if len(docs) == 1 and cfg.format == "chat":
        raise DataError(f"data {cfg.train} holds one conversation: hold some out with data.eval")
    if len(docs) == 1:
        head, tail = _split_one_document(docs[0]["text"], cfg.eval_fraction)
        if not head.strip() or not tail.strip():
            raise DataError(
                f"data {cfg.train} is too short to hold out {cfg.eval_fraction:.0%} of it (or set data.eval)"
            )
        return datasets.Dataset.from_dict({"text": [head]}), datasets.Dataset.from_dict({"text": [tail]})
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
    opts = {"num_proc": cfg.num_proc, "with_positions": cfg.resolved_packing() == "within_document"}
    chat = {"loss_on": cfg.loss_on, "num_proc": cfg.num_proc}
    if cfg.format == "chat" and teacher_tokenizer is not None:  # each its own template, aligned on contents
        toks = (tokenizer, teacher_tokenizer)
        rows = tokenize_conversation_pairs(train_docs, *toks, **chat)
        train = pack_pair(None, *toks, cfg.block_size, rows=rows, **opts)
        rows = tokenize_conversation_pairs(eval_docs, *toks, **chat)
        evalset = pack_pair(None, *toks, cfg.block_size, rows=rows, with_bytes=True, **opts)
    elif cfg.format == "chat":
        train = pack(
            None,
            tokenizer,
            cfg.block_size,
            rows=tokenize_conversations(train_docs, tokenizer, **chat),
            **opts,
        )
        rows = tokenize_conversations(eval_docs, tokenizer, **chat)
        evalset = pack(None, tokenizer, cfg.block_size, rows=rows, with_bytes=True, **opts)
    elif teacher_tokenizer is None:
        train = pack(train_docs, tokenizer, cfg.block_size, **opts)
        evalset = pack(eval_docs, tokenizer, cfg.block_size, with_bytes=True, **opts)
    else:
        pair = opts
        train = pack_pair(train_docs, tokenizer, teacher_tokenizer, cfg.block_size, **pair)
        evalset = pack_pair(eval_docs, tokenizer, teacher_tokenizer, cfg.block_size, with_bytes=True, **pair)
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
    common = {"eos_id": tokenizer.eos_token_id, "documents": (len(train_docs), len(eval_docs))}
    if teacher_tokenizer is None:
        return DataBundle(train.with_format("torch"), evalset.with_format("torch"), cfg.block_size, **common)
    longest = max(max(part[:]["teacher_length"]) for part in (train, evalset))
    pad = teacher_tokenizer.pad_token_id
    pad = teacher_tokenizer.eos_token_id if pad is None else pad
    return DataBundle(
        train,
        evalset,
        cfg.block_size,
        teacher_block_size=max(longest, 1),
        teacher_pad_id=pad or 0,
        **common,
    )
