"""Generated tokens to text and back: the other tokenizer's tokens of the same text, and the char-span
alignment between the two (GOLD's idea -- Patiño et al. 2025, "Unlocking on-policy distillation for any
model family" -- done with sakd's alignment, :func:`sakd.align.positions.align_spans`).

A generated sequence is kept exactly as the model wrote it (the student must be scored on *its* tokens,
not on a canonical re-tokenization of their text). Its text is rebuilt from the bytes every token
contributes (:func:`sakd.align.token_bytes`), decoded incrementally as UTF-8, so each token gets the
character span it ends at even when it holds only part of a multi-byte character (it then ends where
that character ends, as a fast tokenizer's offsets say; bytes that never form a character become U+FFFD,
as ``tokenizer.decode`` does). Special tokens (EOS inside a prompt cut from packed documents, the EOS that
ends a completion) are one virtual character each and map to the other tokenizer's token of the same
role -- the convention of :func:`sakd.data.packing.pack_pair`.

The other tokenizer then encodes the text pieces with offsets, and :func:`align_spans` pairs positions
whose tokens end on the same character: every anchor joins two equal prefixes of one text
(``tests/test_policy_retokenize.py`` checks it with ``tokenizer.decode``).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from sakd.align.positions import PositionAlignment, Span, align_spans
from sakd.align.token_bytes import TokenTable, token_table


@lru_cache(maxsize=8)
def _table(tokenizer: Any) -> TokenTable:
    """The byte table of a tokenizer, built once per tokenizer object (151k tokens take a second)."""
    return token_table(tokenizer)


@dataclass(frozen=True)
class Piece:
    """A run of text, or one special token (``role``: eos / bos / pad / unk / other) between runs."""

    text: str = ""
    role: str | None = None


@dataclass(frozen=True)
class SpelledIds:
    """Token ids, their character spans in one text, and that text as pieces."""

    ids: list[int]
    spans: list[Span]
    pieces: list[Piece]


def _role(table: TokenTable, token_id: int) -> str:
    for role, idx in table.role_ids.items():
        if idx == token_id:
            return role
    return "other"


def spell(ids: list[int], tokenizer: Any) -> SpelledIds:
    """The text ``ids`` spell and each id's character span in it (see the module docstring)."""
    table = _table(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[Piece] = []
    spans: list[Span] = []
    text: list[str] = []  # the current text piece
    emitted = 0  # characters of the whole text so far

    def flush() -> None:
        nonlocal emitted
        tail = decoder.decode(b"", final=True)
        text.append(tail)
        emitted += len(tail)
        if text and "".join(text):
            pieces.append(Piece(text="".join(text)))
        text.clear()

    for token_id in ids:
        start = spans[-1][1] if spans else 0
        if token_id in table.special_ids:
            flush()
            pieces.append(Piece(role=_role(table, token_id)))
            emitted += 1
            spans.append((start, emitted))
            continue
        out = decoder.decode(table.data[token_id] or b"")
        text.append(out)
        emitted += len(out)
        pending = bool(decoder.getstate()[0])  # a character begun but not finished: it ends there
        spans.append((start, emitted + pending))
    flush()
    return SpelledIds(list(ids), spans, pieces)


def _role_id(tokenizer: Any, role: str) -> int:
    idx = getattr(tokenizer, f"{role}_token_id", None) if role != "other" else None
    return int(idx) if isinstance(idx, int) else int(tokenizer.eos_token_id)


def encode(pieces: list[Piece], tokenizer: Any) -> SpelledIds:
    """``tokenizer``'s own tokens of the text ``pieces`` spell, with character spans in that text."""
    ids: list[int] = []
    spans: list[Span] = []
    base = 0
    for piece in pieces:
        if piece.role is not None:
            ids.append(_role_id(tokenizer, piece.role))
            spans.append((base, base + 1))
            base += 1
            continue
        enc = tokenizer(piece.text, add_special_tokens=False, return_offsets_mapping=True)
        ids.extend(enc["input_ids"])
        spans.extend((base + a, base + b) for a, b in enc["offset_mapping"])
        base += len(piece.text)
    return SpelledIds(ids, spans, list(pieces))


def text_length(pieces: list[Piece]) -> int:
    """Characters of the text, a special token counting one."""
    return sum(1 if p.role is not None else len(p.text) for p in pieces)


def text_bytes(pieces: list[Piece]) -> int:
    """UTF-8 bytes of the text, a special token counting one (bits-per-byte denominators)."""
    return sum(1 if p.role is not None else len(p.text.encode("utf-8")) for p in pieces)


@dataclass(frozen=True)
class Paired:
    """One sequence in both tokenizations: the student's ids, the teacher's ids, and the alignment of the
    student positions (:class:`~sakd.align.positions.PositionAlignment`)."""

    student: SpelledIds
    teacher: SpelledIds
    alignment: PositionAlignment


def pair_student_written(student_ids: list[int], student_tok: Any, teacher_tok: Any) -> Paired:
    """The student wrote ``student_ids`` (kept as they are); the teacher reads the same text in its tokens."""
    student = spell(student_ids, student_tok)
    teacher = encode(student.pieces, teacher_tok)
    return Paired(student, teacher, align_spans(student.spans, teacher.spans))


def pair_teacher_written(teacher_ids: list[int], student_tok: Any, teacher_tok: Any) -> Paired:
    """The teacher wrote ``teacher_ids`` (kept: the teacher scores its own tokens); the student learns on
    its own tokenizer's tokens of that text."""
    teacher = spell(teacher_ids, teacher_tok)
    student = encode(teacher.pieces, student_tok)
    return Paired(student, teacher, align_spans(student.spans, teacher.spans))


def as_tensors(paired: Paired) -> dict[str, torch.Tensor]:
    return {
        "teacher_input_ids": torch.tensor(paired.teacher.ids, dtype=torch.long),
        "anchor": paired.alignment.anchor,
        "span_end": paired.alignment.span_end,
    }
