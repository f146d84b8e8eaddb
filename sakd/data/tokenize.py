"""Documents -> tokens: one row per document, the tokenizer's EOS appended after it, written to the
`datasets` cache on disk (a second run with the same text and tokenizers reuses it).

A row holds ``input_ids`` and, when asked for, what the later stages need:

- ``byte_counts`` (``with_bytes``): the UTF-8 bytes of text each token covers, for bits per byte. A
  token covers the text from the end of the token before it to its own end (end offsets: tokenizers that
  trim the leading space off ``Ġthe`` still count the space, and the byte pieces of one character count
  it once); the last token of a document also covers anything after it. So a document's counts sum to
  ``len(text.encode("utf-8"))`` exactly, and the EOS covers 0 bytes: it is not text.
- ``ends``, ``n_chars``, ``teacher_input_ids``, ``teacher_ends`` (with a ``teacher_tokenizer``): the
  character end offsets of both tokenizations of the same text (made non-decreasing), which the paired
  packing aligns; ``ends`` and ``n_chars`` alone with ``with_ends`` (the offline teacher cache aligns
  its blocks with a student's later). Each EOS covers one virtual character after its document (``n_chars + 1``), so both
  tokenizers' EOS tokens share a boundary.
"""

from __future__ import annotations

import hashlib
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from sakd.errors import DataError
from sakd.upstream import dataset_fingerprint

# Part of every cache fingerprint: bump when what a row (or a packed block) holds changes.
DATA_FORMAT_VERSION = 2

IDS = datasets.List(datasets.Value("int32"))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A content hash of a tokenizer (its ``tokenizer.json`` and EOS), for cache keys."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(
        backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab())).encode()
    )
    h.update(f"{type(tokenizer).__name__}|eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


def cache_key(*parts: object) -> str:
    """A fingerprint for a `datasets` cache entry from its inputs (strings, numbers, fingerprints)."""
    return hashlib.sha256("|".join(map(str, (DATA_FORMAT_VERSION, *parts))).encode()).hexdigest()[:24]


def utf8_prefix(text: str) -> np.ndarray:
    """``[len(text) + 1]``: UTF-8 bytes of ``text[:i]`` for every character index ``i``."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    per_char = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    return np.concatenate([[0], np.cumsum(per_char)])


def monotone_ends(offsets: list[tuple[int, int]], n_chars: int) -> np.ndarray:
    """Token end offsets, made non-decreasing and clipped to the text."""
    if not offsets:
        return np.zeros(0, dtype=np.int64)
    ends = np.fromiter((b for _, b in offsets), dtype=np.int64, count=len(offsets))
    return np.minimum(np.maximum.accumulate(ends), n_chars)


def token_bytes(text: str, ends: np.ndarray) -> np.ndarray:
    """UTF-8 bytes each token covers (see the module docstring); they sum to the text's byte count."""
    if ends.size == 0:
        return np.zeros(0, dtype=np.int64)
    prefix = utf8_prefix(text)
    bounds = np.concatenate([[0], ends[:-1], [len(text)]])
    return np.diff(prefix[bounds])


def _then(values: np.ndarray, last: int | None) -> np.ndarray:
    """``values`` with ``last`` appended (the EOS entry), or as they are when there is no EOS."""
    values = values.astype(np.int64, copy=False)
    return values if last is None else np.append(values, np.int64(last))


def _features(with_bytes: bool, with_ends: bool, paired: bool) -> datasets.Features:
    cols: dict[str, Any] = {"input_ids": IDS}
    if with_bytes:
        cols["byte_counts"] = IDS
    if with_ends or paired:
        cols.update(ends=IDS, n_chars=datasets.Value("int64"))
    if paired:
        cols.update(teacher_input_ids=IDS, teacher_ends=IDS)
    return datasets.Features(cols)


def _require_fast(tokenizer: PreTrainedTokenizerBase, role: str, why: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"the {role} tokenizer is not a fast (Rust) tokenizer; {why} needs character offsets — save it "
            "with `tokenizers` / use_fast=True"
        )


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], offsets: bool) -> tuple[list, list | None]:
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets, verbose=False)
    return enc["input_ids"], (enc["offset_mapping"] if offsets else None)


def tokenize_documents(
    docs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    with_bytes: bool = False,
    with_ends: bool = False,
    num_proc: int = 1,
) -> datasets.Dataset:
    """One row per document of ``docs`` (a ``text`` column): see the module docstring for the columns."""
    paired = teacher_tokenizer is not None
    with_ends = with_ends or paired
    if with_ends:
        _require_fast(tokenizer, "student", "character alignment")
    if paired:
        _require_fast(tokenizer, "student", "cross-tokenizer alignment")
        _require_fast(teacher_tokenizer, "teacher", "cross-tokenizer alignment")
    if with_bytes:
        _require_fast(tokenizer, "student", "bits per byte")
    eos = tokenizer.eos_token_id
    t_eos = teacher_tokenizer.eos_token_id if paired else None
    offsets = with_ends or with_bytes

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        texts = batch["text"]
        ids, offs = _encode(tokenizer, texts, offsets)
        out: dict[str, list] = {"input_ids": [seq + [eos] if eos is not None else seq for seq in ids]}
        if not offsets:
            return out
        ends = [monotone_ends(o, len(t)) for o, t in zip(offs, texts, strict=True)]
        if with_bytes:
            zero = None if eos is None else 0
            out["byte_counts"] = [_then(token_bytes(t, e), zero) for t, e in zip(texts, ends, strict=True)]
        if with_ends:
            out["n_chars"] = [len(t) for t in texts]
            out["ends"] = [
                _then(e, None if eos is None else len(t) + 1) for t, e in zip(texts, ends, strict=True)
            ]
        if paired:
            t_ids, t_offs = _encode(teacher_tokenizer, texts, True)
            out["teacher_input_ids"] = [seq + [t_eos] if t_eos is not None else seq for seq in t_ids]
            out["teacher_ends"] = [
                _then(monotone_ends(o, len(t)), None if t_eos is None else len(t) + 1)
                for o, t in zip(t_offs, texts, strict=True)
            ]
        return out

    key = cache_key(
        "tokenize",
        dataset_fingerprint(docs),
        tokenizer_fingerprint(tokenizer),
        tokenizer_fingerprint(teacher_tokenizer) if paired else "-",
        with_bytes,
        with_ends,
    )
    return docs.map(
        encode,
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=docs.column_names,
        features=_features(with_bytes, with_ends, paired),
        new_fingerprint=key,
        desc="tokenizing",
    )
