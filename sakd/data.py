"""Data: text through `datasets`, tokenization, packing into blocks, the held-out split, batch order.

The batch order is a pure function of (seed, epoch, optimizer step): optimizer step ``s`` consumes
the global slice ``order[s*G:(s+1)*G]`` with ``G = micro_batch * accumulation * world_size``, and
micro-batch ``m`` of rank ``r`` takes ``b`` consecutive blocks of it.  So the blocks of one
optimizer step do not depend on how they are split into micro-batches or ranks (1x8 == 4x2 ==
2 ranks x 4), and a resumed run continues from exactly the next block.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from sakd.align.positions import align_spans
from sakd.config import DataConfig

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data problem a user can fix; one line."""


def load_text_dataset(
    spec: str, *, split: str = "train", text_field: str = "text", dataset_config: str | None = None
) -> datasets.Dataset:
    """A `datasets.Dataset` with one ``text`` column, from a local file or a hub dataset name."""
    path = Path(spec).expanduser()
    if path.suffix in LOCAL_BUILDERS or path.exists() or spec.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"data file not found: {spec}")
        if path.is_dir():
            raise DataError(f"data path is a directory; give a .txt, .jsonl or .parquet file: {spec}")
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(
                f"unsupported data file type '{path.suffix}' ({spec}); use .txt, .jsonl or .parquet"
            )
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except OSError as e:
            raise DataError(f"cannot read data file {spec}: {e.strerror}") from None
        if path.stat().st_size == 0:
            raise DataError(f"data file is empty: {spec}")
        try:
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"cannot parse data file {spec} as {builder}: {str(e).splitlines()[0]}") from None
    else:
        try:
            ds = datasets.load_dataset(spec, dataset_config, split=split)
        except Exception as e:
            raise DataError(f"cannot load dataset '{spec}': {str(e).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise DataError(
            f"dataset {spec} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); set data.text_field"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.filter(lambda t: bool(t and t.strip()), input_columns="text")


def pack(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int) -> datasets.Dataset:
    """Tokenize documents (EOS after each), concatenate, cut into ``block_size`` blocks (remainder dropped)."""
    eos = tokenizer.eos_token_id

    def tokenize_and_group(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids: list[int] = []
        for seq in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            if eos is not None:
                ids.append(eos)
        n = len(ids) // block_size
        return {"input_ids": [ids[i * block_size : (i + 1) * block_size] for i in range(n)]}

    return ds.map(tokenize_and_group, batched=True, batch_size=2000, remove_columns=ds.column_names)


def _offsets_stream(
    tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and global character spans of ``texts`` joined by EOS (each EOS covers one virtual
    character after its document, so both tokenizers' EOS tokens share a boundary)."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    base = 0
    for text, seq, offs in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids.extend(seq)
        spans.extend((base + a, base + b) for a, b in offs)
        base += len(text)
        if eos is not None:
            ids.append(eos)
            spans.append((base, base + 1))
        base += 1
    return ids, spans


def pack_pair(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    block_size: int,
) -> datasets.Dataset:
    """Like :func:`pack`, plus the teacher's tokens of the same text and the position alignment.

    Each block holds ``block_size`` student tokens (``input_ids``); ``teacher_input_ids`` are the
    teacher tokens whose end falls inside the block's character range (a variable number), and
    ``anchor`` / ``span_end`` the :class:`~sakd.align.positions.PositionAlignment` of the block.
    """
    for name, tok in (("student", tokenizer), ("teacher", teacher_tokenizer)):
        if not getattr(tok, "is_fast", False):
            raise DataError(
                f"the {name} tokenizer is not a fast (Rust) tokenizer; cross-tokenizer alignment needs "
                "character offsets — save it with `tokenizers` / use_fast=True"
            )

    def tokenize_and_group(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        s_ids, s_spans = _offsets_stream(tokenizer, batch["text"])
        t_ids, t_spans = _offsets_stream(teacher_tokenizer, batch["text"])
        t_ends = [b for _, b in t_spans]
        for i in range(1, len(t_ends)):  # non-decreasing for bisect (trimmed/zero-width spans)
            t_ends[i] = max(t_ends[i], t_ends[i - 1])
        out: dict[str, list[list[int]]] = {
            "input_ids": [],
            "teacher_input_ids": [],
            "anchor": [],
            "span_end": [],
            "teacher_length": [],
        }
        lo_char = 0
        for i in range(len(s_ids) // block_size):
            blk = slice(i * block_size, (i + 1) * block_size)
            hi_char = max(b for _, b in s_spans[blk])
            t_lo, t_hi = bisect.bisect_right(t_ends, lo_char), bisect.bisect_right(t_ends, hi_char)
            al = align_spans(s_spans[blk], t_spans[t_lo:t_hi])
            out["input_ids"].append(s_ids[blk])
            out["teacher_input_ids"].append(t_ids[t_lo:t_hi])
            out["teacher_length"].append(t_hi - t_lo)
            out["anchor"].append(al.anchor.tolist())
            out["span_end"].append(al.span_end.tolist())
            lo_char = hi_char
        return out

    return ds.map(tokenize_and_group, batched=True, batch_size=2000, remove_columns=ds.column_names)


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


def prepare_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> DataBundle:
    """Load, split (by document), tokenize and pack the corpus described by ``cfg``.

    With ``teacher_tokenizer`` the blocks also carry the teacher's tokens and the alignment.
    """
    if not cfg.train:
        raise DataError("no training data: set data.train to a .txt/.jsonl/.parquet file or a dataset name")
    docs = load_text_dataset(
        cfg.train, split=cfg.split, text_field=cfg.text_field, dataset_config=cfg.dataset_config
    )
    if len(docs) == 0:
        raise DataError(f"data {cfg.train} holds no non-empty documents")
    if cfg.eval:
        train_docs = docs
        eval_docs = load_text_dataset(
            cfg.eval, split=cfg.eval_split, text_field=cfg.text_field, dataset_config=cfg.dataset_config
        )
    else:
        if len(docs) < 2:
            raise DataError(
                f"data {cfg.train} has 1 document; a held-out split needs more (or set data.eval)"
            )
        split = docs.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
        train_docs, eval_docs = split["train"], split["test"]
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


@functools.lru_cache(maxsize=2)
def _epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The block order of one epoch (cached: it is asked for at every optimizer step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_blocks, generator=g)


@dataclass(frozen=True)
class BatchPlan:
    """Which blocks each rank reads at each optimizer step (see the module docstring)."""

    num_blocks: int
    micro_batch: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def blocks_per_step(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_blocks // self.blocks_per_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return _epoch_order(self.num_blocks, self.seed, epoch)

    def micro_batches(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """The ``accumulation`` micro-batches (block indices) of one optimizer step on ``rank``."""
        order = self.epoch_order(epoch)
        start = step_in_epoch * self.blocks_per_step
        out = []
        for m in range(self.accumulation):
            lo = start + (m * self.world_size + rank) * self.micro_batch
            out.append(order[lo : lo + self.micro_batch].tolist())
        return out
