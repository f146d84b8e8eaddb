"""Tokens out: the documents' tokens (EOS after each, :mod:`sakd.data.tokenize`) concatenated into one
stream and cut into blocks of ``block_size`` tokens -- for one tokenizer (:func:`pack`), or for two
(:func:`pack_pair`: each block of student tokens carries the teacher's tokens of the same text and the
char-span alignment).

Block ``k`` is tokens ``[k * block_size, (k + 1) * block_size)`` of the whole stream, wherever the
documents begin and end; only the stream's last ``< block_size`` tokens are left out. The blocks are
built by a `datasets` map over block indices that reads the per-document rows each block spans, so
the work splits over processes (``num_proc``) without a carry between batches, and the result is
cached on disk next to the tokenized rows (a second run reuses it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from sakd.align.positions import align_ends
from sakd.data.tokenize import IDS, cache_key, tokenize_documents
from sakd.upstream import dataset_fingerprint

BLOCKS_PER_MAP_BATCH = 256


def flat_column(table: pa.Table, column: str) -> np.ndarray:
    """The concatenated list entries of ``column``: a zero-copy view of the memory-mapped rows where
    Arrow allows (slice it before converting: a long document spans many map batches)."""
    return pc.list_flatten(table.column(column)).to_numpy()


class DocumentStream:
    """The per-document token rows as one stream: where each document starts, and read access to the
    stretch of documents that holds a range of stream positions."""

    def __init__(self, rows: datasets.Dataset, column: str = "input_ids") -> None:
        self.rows = rows
        self.table = rows.with_format("arrow")
        lengths = pc.list_value_length(self.table[column]).to_numpy(zero_copy_only=False).astype(np.int64)
        self.starts = np.concatenate(
            [[0], np.cumsum(lengths)]
        )  # document d = stream [starts[d], starts[d+1])

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def docs(self, lo: int, hi: int) -> tuple[int, int]:
        """The documents ``[d0, d1)`` that hold stream positions ``[lo, hi)``."""
        d0 = int(np.searchsorted(self.starts, lo, side="right")) - 1
        d1 = int(np.searchsorted(self.starts, hi - 1, side="right"))
        return d0, d1

    def span(
        self, lo: int, hi: int, column: str = "input_ids", offsets: np.ndarray | None = None
    ) -> np.ndarray:
        """Stream positions ``[lo, hi)`` of ``column``; with ``offsets`` (one per document) each value plus
        its document's offset (character ends made global)."""
        d0, d1 = self.docs(lo, hi)
        values = flat_column(self.table[d0:d1], column).astype(np.int64)
        if offsets is not None:
            values = values + np.repeat(offsets[d0:d1], np.diff(self.starts[d0 : d1 + 1]))
        skip = lo - int(self.starts[d0])
        return values[skip : skip + hi - lo]

    def positions(self, lo: int, hi: int) -> np.ndarray:
        """Each stream position's index inside its document (0 at every document start), ``[lo, hi)``."""
        return document_positions(self.starts, lo, hi)


def document_positions(starts: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Stream positions ``[lo, hi)`` as indices inside their documents (document ``d`` is
    ``[starts[d], starts[d + 1])``)."""
    at = np.arange(lo, hi, dtype=np.int64)
    return at - starts[np.searchsorted(starts, at, side="right") - 1]


def _blocks(
    stream: DocumentStream,
    block_size: int,
    build: Callable[[int, int], dict[str, Any]],
    features: datasets.Features,
    key: str,
    num_proc: int,
) -> datasets.Dataset:
    """A dataset of the stream's full blocks: ``build(first_block, last_block + 1)`` makes the columns of
    a run of consecutive blocks; cached next to the tokenized rows when those are on disk."""
    n_blocks = stream.total // block_size
    index = datasets.Dataset.from_dict({"block": np.arange(n_blocks, dtype=np.int64)})
    cache_files = stream.rows.cache_files
    cache_file = (
        str(Path(cache_files[0]["filename"]).parent / f"sakd-blocks-{key}.arrow") if cache_files else None
    )
    return index.map(
        lambda batch: build(int(batch["block"][0]), int(batch["block"][-1]) + 1),
        batched=True,
        batch_size=BLOCKS_PER_MAP_BATCH,
        num_proc=num_proc if num_proc > 1 and n_blocks > BLOCKS_PER_MAP_BATCH else None,
        remove_columns=["block"],
        features=features,
        new_fingerprint=key,
        cache_file_name=cache_file,
        desc="packing",
    )


def pack(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    with_bytes: bool = False,
    with_positions: bool = False,
    num_proc: int = 1,
    rows: datasets.Dataset | None = None,
) -> datasets.Dataset:
    """Tokenize documents (EOS after each), concatenate, cut into ``block_size`` blocks (``input_ids``;
    with ``with_bytes`` also ``byte_counts``, the UTF-8 bytes each token covers; with ``with_positions``
    ``position``, each token's index inside its document, which within-document packing turns into a
    block-diagonal attention mask). ``rows``: documents already tokenized (conversations,
    :mod:`sakd.data.chat`: their per-token ``target`` column is packed too)."""
    if rows is None:
        rows = tokenize_documents(ds, tokenizer, with_bytes=with_bytes, num_proc=num_proc)
    stream = DocumentStream(rows)
    columns = ["input_ids"] + [c for c in ("byte_counts", "target") if c in rows.column_names]
    if not with_bytes and "byte_counts" in columns:
        columns.remove("byte_counts")

    def build(k0: int, k1: int) -> dict[str, Any]:
        lo, hi = k0 * block_size, k1 * block_size
        d0, d1 = stream.docs(lo, hi)
        table = stream.table[d0:d1]
        skip = lo - int(stream.starts[d0])
        out = {c: flat_column(table, c)[skip : skip + hi - lo].reshape(k1 - k0, block_size) for c in columns}
        if with_positions:
            out["position"] = stream.positions(lo, hi).reshape(k1 - k0, block_size)
        return out

    names = columns + (["position"] if with_positions else [])
    features = datasets.Features({c: rows.features[c] if c == "target" else IDS for c in names})
    key = cache_key("pack", dataset_fingerprint(rows), block_size, with_bytes, with_positions)
    return _blocks(stream, block_size, build, features, key, num_proc)


PAIR_FEATURES = datasets.Features(
    {
        "input_ids": IDS,
        "teacher_input_ids": IDS,
        "anchor": IDS,
        "span_end": IDS,
        "teacher_length": datasets.Value("int32"),
    }
)


def pack_pair(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    with_bytes: bool = False,
    with_positions: bool = False,
    num_proc: int = 1,
    rows: datasets.Dataset | None = None,
) -> datasets.Dataset:
    """Like :func:`pack`, plus the teacher's tokens of the same text and the position alignment.

    Each block holds ``block_size`` student tokens (``input_ids``); ``teacher_input_ids`` are the
    teacher tokens whose end falls inside the block's character range (after the previous block's last
    student token, up to this block's last), a variable number; ``anchor`` / ``span_end`` are the
    :class:`~sakd.align.positions.PositionAlignment` of the block; with ``with_positions`` also
    ``position`` / ``teacher_position`` (each token's index inside its document, both tokenizations).

    ``rows``: documents already tokenized by both (conversations, :mod:`sakd.data.chat_pair`: their
    ``ends`` are content coordinates, their ``target`` column is packed too, and a student position whose
    ``anchorable`` flag is 0 gets no anchor).
    """
    if rows is None:
        rows = tokenize_documents(
            ds, tokenizer, teacher_tokenizer=teacher_tokenizer, with_bytes=with_bytes, num_proc=num_proc
        )
    stream = DocumentStream(rows)
    # document d covers the global characters [char_base[d], char_base[d + 1]) (its text, then its EOS)
    n_chars = stream.table["n_chars"].to_numpy(zero_copy_only=False).astype(np.int64)
    char_base = np.concatenate([[0], np.cumsum(n_chars + 1)])
    t_lengths = pc.list_value_length(stream.table["teacher_input_ids"]).to_numpy(zero_copy_only=False)
    extra = ["byte_counts"] if with_bytes else []
    extra += ["target"] if "target" in rows.column_names else []
    gate = "anchorable" in rows.column_names  # conversations: only content positions may be anchored
    positions = ["position", "teacher_position"] if with_positions else []
    t_starts = np.concatenate([[0], np.cumsum(t_lengths)]).astype(np.int64)  # teacher stream, per document

    def build(k0: int, k1: int) -> dict[str, Any]:
        lo, hi = k0 * block_size, k1 * block_size
        d0, d1 = stream.docs(max(lo - 1, 0), min(hi + 1, stream.total))  # a token either side: their ends
        table = stream.table[d0:d1]
        lengths = np.diff(stream.starts[d0 : d1 + 1])
        s_ends = flat_column(table, "ends") + np.repeat(char_base[d0:d1], lengths)  # global, non-decreasing
        t_ids = flat_column(table, "teacher_input_ids")
        t_ends = flat_column(table, "teacher_ends") + np.repeat(char_base[d0:d1], t_lengths[d0:d1])
        s_ids = flat_column(table, "input_ids")
        skip = int(stream.starts[d0])
        out: dict[str, list] = {c: [] for c in [*PAIR_FEATURES, *extra, *positions]}
        flats = {c: flat_column(table, c) for c in extra + (["anchorable"] if gate else [])}

        def cut(at: int) -> int:
            """The teacher stream index where student position ``at`` (stream-relative) starts a block: after
            every teacher token ending at or before the previous student token's end -- but in a run of
            template tokens that share one coordinate (conversations), the teacher's tokens at it go with
            the later block, which holds the rest of that run and the content it introduces."""
            if at <= 0:
                return 0  # from the start: template tokens end at 0
            end = int(s_ends[at - 1])
            tie = gate and at < len(s_ends) and int(s_ends[at]) == end
            return int(np.searchsorted(t_ends, end, side="left" if tie else "right"))

        for k in range(k0, k1):
            a, b = k * block_size - skip, (k + 1) * block_size - skip
            t_lo, t_hi = cut(a) if k > 0 else 0, cut(b)
            al = align_ends(s_ends[a:b], t_ends[t_lo:t_hi])
            anchor, span_end = al.anchor.numpy(), al.span_end.numpy()
            if gate:  # span_end keeps the next token's shared boundary: it ends on a content character
                keep = flats["anchorable"][a:b] > 0
                anchor, span_end = np.where(keep, anchor, -1), np.where(keep, span_end, -1)
            out["input_ids"].append(s_ids[a:b])
            out["teacher_input_ids"].append(t_ids[t_lo:t_hi])
            out["teacher_length"].append(int(t_hi - t_lo))
            out["anchor"].append(anchor)
            out["span_end"].append(span_end)
            for c in extra:
                out[c].append(flats[c][a:b])
            if with_positions:
                out["position"].append(stream.positions(skip + a, skip + b))
                base = int(t_starts[d0])
                out["teacher_position"].append(document_positions(t_starts, base + t_lo, base + t_hi))
        return out

    columns = {c: rows.features[c] if c == "target" else IDS for c in [*extra, *positions]}
    features = datasets.Features({**PAIR_FEATURES, **columns})
    key = cache_key("pack_pair", dataset_fingerprint(rows), block_size, with_bytes, with_positions, "runs")
    return _blocks(stream, block_size, build, features, key, num_proc)
