"""Blocks of one tokenizer's tokens with the character each token ends at, in one coordinate for the whole
training text: the teacher's blocks the cache is written for, and a student's blocks that read it.

The blocks are exactly those :func:`sakd.data.packing.pack` makes (documents tokenized without special
tokens, EOS after each, cut into ``block_size`` tokens within each ``datasets.map`` batch of 2,000
documents, the remainder of a batch dropped; tested), so a student with the teacher's tokenizer and block
size reads cache block ``i`` as its training block ``i``. Character positions are global: document ``d``
starts at ``Σ_{d' < d} (len(text_{d'}) + 1)`` (its EOS covers one virtual character after it, as in
:func:`sakd.data.packing.pack_pair`), so two tokenizations of the same documents can be aligned by
character ends without re-reading the text.

Per block: ``input_ids`` and ``char_end`` (``[block_size]``, non-decreasing), ``char_base`` (where the
block's text starts), ``follows_previous`` (False for the first block of a map batch: the dropped remainder
of the previous batch lies between them) and ``next_id`` (the token after the block, -1 if unknown).
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np

PACK_BATCH_DOCUMENTS = 2000  # the batch size of sakd.data.packing.pack's datasets.map


def document_starts(docs: datasets.Dataset) -> np.ndarray:
    """``[D]`` int64: the global character offset at which each document starts."""
    lengths = np.fromiter((len(t) + 1 for t in docs["text"]), dtype=np.int64, count=len(docs))
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def token_stream(
    tokenizer: Any, texts: list[str], starts: list[int] | np.ndarray
) -> tuple[list[int], list[int]]:
    """Token ids of ``texts`` (EOS after each) and each token's global character end (non-decreasing)."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    ends: list[int] = []
    high = int(starts[0]) if len(texts) else 0
    for text, seq, offsets, start in zip(texts, enc["input_ids"], enc["offset_mapping"], starts, strict=True):
        start = int(start)
        ids.extend(seq)
        for _, end in offsets:  # trimmed or zero-width spans never move a boundary back
            high = max(high, start + int(end))
            ends.append(high)
        if eos is not None:
            ids.append(eos)
            high = max(high, start + len(text) + 1)
            ends.append(high)
    return ids, ends


class BlockCutter:
    """The ``datasets.map`` function (batched, with indices) that cuts one batch of documents into blocks."""

    def __init__(self, tokenizer: Any, block_size: int, starts: np.ndarray) -> None:
        self.tokenizer, self.block_size, self.starts = tokenizer, block_size, starts

    def blocks(self, batch: dict[str, list], indices: list[int]) -> tuple[list[int], list[int], int, int]:
        """The batch's token stream, its character ends, where its text starts, and its block count."""
        first = int(self.starts[indices[0]])
        ids, ends = token_stream(self.tokenizer, batch["text"], self.starts[indices])
        return ids, ends, first, len(ids) // self.block_size

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        ids, ends, first, n = self.blocks(batch, indices)
        bs = self.block_size
        out: dict[str, list] = {
            k: [] for k in ("input_ids", "char_end", "char_base", "follows_previous", "next_id")
        }
        for i in range(n):
            out["input_ids"].append(ids[i * bs : (i + 1) * bs])
            out["char_end"].append(ends[i * bs : (i + 1) * bs])
            out["char_base"].append(first if i == 0 else ends[i * bs - 1])
            out["follows_previous"].append(i > 0)
            out["next_id"].append(ids[(i + 1) * bs] if (i + 1) * bs < len(ids) else -1)
        return out


def token_blocks(docs: datasets.Dataset, tokenizer: Any, block_size: int) -> datasets.Dataset:
    """The packed blocks of ``docs`` with their character ends (see the module docstring)."""
    cutter = BlockCutter(tokenizer, block_size, document_starts(docs))
    return docs.map(
        cutter,
        batched=True,
        batch_size=PACK_BATCH_DOCUMENTS,
        with_indices=True,
        remove_columns=docs.column_names,
    )
