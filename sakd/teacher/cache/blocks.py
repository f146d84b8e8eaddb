"""Blocks of one tokenizer's tokens with the character each token ends at, in one coordinate for the whole
training text: the teacher's blocks the cache is written for, and a student's blocks that read it.

The blocks are exactly those :func:`sakd.data.packing.pack` makes -- the documents' token rows of
:func:`sakd.data.tokenize.tokenize_documents` (EOS after each) as one stream, block ``k`` its tokens
``[k * block_size, (k + 1) * block_size)``, only the stream's last ``< block_size`` tokens left out
(tested) -- so a student with the teacher's tokenizer and block size reads cache block ``i`` as its
training block ``i``. Character positions are global: document ``d`` starts at
``Σ_{d' < d} (len(text_{d'}) + 1)`` (its EOS covers one virtual character after it, as in
:func:`sakd.data.packing.pack_pair`), so two tokenizations of the same documents can be aligned by
character ends without re-reading the text.

Per block: ``input_ids`` and ``char_end`` (``[block_size]``, non-decreasing), ``char_base`` (where the
block's text starts), ``follows_previous`` (whether the block continues the previous block's token
stream: every block but the first), ``next_id`` (the token after the block, -1 at the stream's end) and
``position`` (each token's index inside its document: ``data.packing=within_document`` turns it into the
document mask the live path gives the teacher, :mod:`sakd.data.documents`).

Conversations (``rows`` from :func:`sakd.data.chat_pair.tokenize_conversation_ends`): the documents are the
teacher's renderings, the character ends are content coordinates (:mod:`sakd.data.chat_pair`), and each
block also carries the rows' ``target``, ``content_kd`` and ``anchorable`` flags.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np

from sakd.data.packing import DocumentStream
from sakd.data.tokenize import tokenize_documents

BLOCKS_PER_MAP_BATCH = 256


class BlockStream:
    """The documents' tokens as one stream with global character ends, and its full blocks."""

    def __init__(
        self, docs: datasets.Dataset, tokenizer: Any, block_size: int, rows: datasets.Dataset | None = None
    ) -> None:
        self.rows = tokenize_documents(docs, tokenizer, with_ends=True) if rows is None else rows
        self.flags = [c for c in ("target", "content_kd", "anchorable") if c in self.rows.column_names]
        self.stream = DocumentStream(self.rows)
        n_chars = self.stream.table["n_chars"].to_numpy(zero_copy_only=False).astype(np.int64)
        self.char_base = np.concatenate([[0], np.cumsum(n_chars + 1)])  # where each document starts
        self.block_size = block_size
        self.n_blocks = self.stream.total // block_size

    def window(self, k0: int, k1: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Ids and global character ends of blocks ``[k0, k1)`` plus one token either side where the
        stream has it, and the stream position of the first returned token."""
        lo = max(k0 * self.block_size - 1, 0)
        hi = min(k1 * self.block_size + 1, self.stream.total)
        ids = self.stream.span(lo, hi)
        ends = self.stream.span(lo, hi, "ends", offsets=self.char_base)
        return ids, ends, lo

    def blocks(self, k0: int, k1: int) -> list[dict[str, Any]]:
        """Blocks ``[k0, k1)``: the columns of the module docstring, one dict per block."""
        ids, ends, lo = self.window(k0, k1)
        hi = lo + len(ids)
        positions = self.stream.positions(lo, hi)
        flags = {c: self.stream.span(lo, hi, c) for c in self.flags}
        bs, out = self.block_size, []
        for k in range(k0, k1):
            a = k * bs - lo
            out.append(
                {
                    "input_ids": ids[a : a + bs],
                    "char_end": ends[a : a + bs],
                    "char_base": int(ends[a - 1]) if k > 0 else 0,
                    "follows_previous": k > 0,
                    "next_id": int(ids[a + bs]) if a + bs < len(ids) else -1,
                    "position": positions[a : a + bs],
                    **{c: v[a : a + bs] for c, v in flags.items()},
                }
            )
        return out

    def map_blocks(self, fn: Any, fingerprint: str | None = None) -> datasets.Dataset:
        """``datasets.map`` over the block indices: ``fn(blocks)`` (a list of :meth:`blocks` dicts) returns
        the columns of those blocks."""
        index = datasets.Dataset.from_dict({"block": np.arange(self.n_blocks, dtype=np.int64)})
        return index.map(
            lambda batch: fn(self.blocks(int(batch["block"][0]), int(batch["block"][-1]) + 1)),
            batched=True,
            batch_size=BLOCKS_PER_MAP_BATCH,
            remove_columns=["block"],
            new_fingerprint=fingerprint,
        )


def _columns(blocks: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [b[k] for b in blocks] for k in blocks[0]}


def token_blocks(
    docs: datasets.Dataset, tokenizer: Any, block_size: int, rows: datasets.Dataset | None = None
) -> datasets.Dataset:
    """The packed blocks of ``docs`` (or of tokenized ``rows``) with their character ends (see the module
    docstring)."""
    return BlockStream(docs, tokenizer, block_size, rows).map_blocks(_columns)
