"""Tokens out: documents tokenized (EOS after each), concatenated and cut into blocks of
``block_size`` tokens -- for one tokenizer (:func:`pack`), or for two (:func:`pack_pair`: each block
of student tokens carries the teacher's tokens of the same text and the char-span alignment)."""

from __future__ import annotations

import bisect

import datasets
from transformers import PreTrainedTokenizerBase

from sakd.align.positions import align_spans
from sakd.errors import DataError


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
