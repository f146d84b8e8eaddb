"""Conversations across tokenizers: the student and the teacher each render a conversation with their own
chat template, so the two rendered strings differ (another default system prompt, other role markers),
and the alignment of :mod:`sakd.align.positions` runs on the characters of the **message contents**
instead of on the rendered text.

The *content coordinate* of a token: each side records, per message, the character span of its content
inside its own rendering (:func:`sakd.data.chat.render`). The contents are laid end to end, one virtual
character apart -- message ``i`` occupies coordinates ``(base[i], base[i] + len_i]`` with
``base[i + 1] = base[i] + len_i + 1`` -- and a token that ends inside message ``i``'s content, ``e``
characters into it, gets coordinate ``base[i] + e``; a token that ends in template text (role markers,
``<|im_end|>``, a default system prompt) gets the coordinate of the gap before the next content,
``base[i + 1]``, which no content token has. The coordinates of both sides go into the existing
alignment (:func:`sakd.data.packing.pack_pair`, :func:`~sakd.align.positions.align_ends`, the chain
rule over ``span_end``), exactly as character ends of one text do.

What carries KD: a student position is anchored only when its token *and* its next token end on content
characters of the same message (the ``anchorable`` flag, applied after the alignment): both models have
read the same contents and predict the next content text. So no template token is anchored, and no
position whose next token is a template token (the end-of-turn ``<|im_end|>``, the first token after a
header) carries KD -- template tokens get CE only, as ``data.loss_on`` says. The first content token
of each message is predicted by a template token and so gets CE only too.
"""

from __future__ import annotations

import hashlib

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from sakd.data.chat import encode_rendered, require_template
from sakd.data.tokenize import IDS, cache_key, tokenizer_fingerprint
from sakd.errors import DataError
from sakd.upstream import dataset_fingerprint

PAIR_ROW_FEATURES = datasets.Features(
    {
        "input_ids": IDS,
        "target": datasets.List(datasets.Value("int8")),
        "byte_counts": IDS,
        "ends": IDS,
        "n_chars": datasets.Value("int64"),
        "anchorable": datasets.List(datasets.Value("int8")),
        "teacher_input_ids": IDS,
        "teacher_ends": IDS,
    }
)


def content_length(contents: list[tuple[int, int]]) -> int:
    """The last coordinate of a conversation: its contents and the virtual character after each."""
    return int(sum(b - a + 1 for a, b in contents))


def content_coordinates(ends: np.ndarray, contents: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each token's content coordinate (module docstring) from its character end in the rendered text and
    the messages' content spans in that text; and the message whose content it ends in (-1: template)."""
    ends = np.asarray(ends, dtype=np.int64)
    if not contents:
        return np.zeros_like(ends), np.full(len(ends), -1, dtype=np.int64)
    starts = np.array([a for a, _ in contents], dtype=np.int64)
    stops = np.array([b for _, b in contents], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(stops - starts + 1)])
    i = np.searchsorted(starts, ends, side="left") - 1  # the last content that starts before the end
    inside = (i >= 0) & (ends <= stops[np.maximum(i, 0)])
    coord = np.where(inside, base[np.maximum(i, 0)] + ends - starts[np.maximum(i, 0)], base[i + 1])
    return coord, np.where(inside, i, -1)


def anchorable(message: np.ndarray) -> np.ndarray:
    """Student positions that may carry KD: the token and its next token end in the same message's content."""
    out = np.zeros(len(message), dtype=np.int8)
    if len(message) > 1:
        out[:-1] = (message[:-1] >= 0) & (message[:-1] == message[1:])
    return out


def content_kd(
    ends: np.ndarray, contents: list[tuple[int, int]], roles: list[str], loss_on: str
) -> np.ndarray:
    """Tokens that end inside a message content before its last character -- an assistant's (``loss_on:
    assistant``) or any (``all``): the only positions a student aligned on the contents can anchor a KD
    position at (its token and its next token end in one content, so the anchor's teacher token ends
    inside that content, short of its end). The rest of a teacher's positions carry no KD for any student."""
    ends = np.asarray(ends, dtype=np.int64)
    out = np.zeros(len(ends), dtype=np.int8)
    for (a, b), role in zip(contents, roles, strict=True):
        if loss_on == "all" or role == "assistant":
            out |= ((ends > a) & (ends < b)).astype(np.int8)
    return out


def encode_ends(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], loss_on: str, where: str = "a conversation"
) -> dict[str, np.ndarray]:
    """One conversation for an offline teacher cache: the model's own row (``input_ids``, ``target``),
    content-coordinate ``ends`` and ``n_chars``, the ``content_kd`` flag (:func:`content_kd`: what the
    teacher's cache stores) and ``anchorable`` (:func:`anchorable`: where a student reading it may anchor)."""
    row, ends, r = encode_rendered(tokenizer, messages, loss_on, where)
    coord, message = content_coordinates(ends, r.contents)
    return {
        "input_ids": row["input_ids"],
        "target": row["target"],
        "ends": coord,
        "n_chars": content_length(r.contents),
        "content_kd": content_kd(ends, r.contents, [m["role"] for m in messages], loss_on),
        "anchorable": anchorable(message),
    }


def tokenize_conversation_ends(
    convs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    loss_on: str = "assistant",
    role: str = "teacher",
) -> datasets.Dataset:
    """One row per conversation (:func:`encode_ends`), cached on disk: what the offline teacher cache packs,
    and what a student with another tokenizer or template aligns with it (:mod:`sakd.teacher.cache`)."""
    require_template(tokenizer, role)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"the {role} tokenizer is not a fast (Rust) tokenizer; a chat cache needs offsets")
    features = datasets.Features(
        {
            "input_ids": IDS,
            "target": datasets.List(datasets.Value("int8")),
            "ends": IDS,
            "n_chars": datasets.Value("int64"),
            "content_kd": datasets.List(datasets.Value("int8")),
            "anchorable": datasets.List(datasets.Value("int8")),
        }
    )

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [
            encode_ends(tokenizer, m, loss_on, f"conversation {i}")
            for m, i in zip(batch["messages"], indices, strict=True)
        ]
        return {k: [r[k] for r in rows] for k in features}

    template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]
    key = cache_key(
        "chat_ends", dataset_fingerprint(convs), tokenizer_fingerprint(tokenizer), template, loss_on
    )
    return convs.map(
        encode,
        batched=True,
        with_indices=True,
        batch_size=256,
        remove_columns=convs.column_names,
        features=features,
        new_fingerprint=key,
        desc="rendering conversations (teacher cache)",
    )


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    loss_on: str,
    where: str = "a conversation",
) -> dict[str, np.ndarray]:
    """One conversation for both models: the student's row of :func:`sakd.data.chat.encode_conversation`
    plus content-coordinate ``ends`` and ``n_chars``, ``anchorable``, and the teacher's own rendering's
    ``teacher_input_ids`` / ``teacher_ends`` (content coordinates)."""
    row, ends, r = encode_rendered(tokenizer, messages, loss_on, where)
    t_row, t_ends, t_r = encode_rendered(teacher_tokenizer, messages, loss_on, f"{where} (teacher template)")
    s_coord, s_msg = content_coordinates(ends, r.contents)
    t_coord, _ = content_coordinates(t_ends, t_r.contents)
    return {
        **row,
        "ends": s_coord,
        "n_chars": content_length(r.contents),
        "anchorable": anchorable(s_msg),
        "teacher_input_ids": t_row["input_ids"],
        "teacher_ends": t_coord,
    }


def tokenize_conversation_pairs(
    convs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    *,
    loss_on: str = "assistant",
    num_proc: int = 1,
) -> datasets.Dataset:
    """One row per conversation (:func:`encode_pair`), cached on disk: what
    :func:`sakd.data.packing.pack_pair` packs with ``rows=``."""
    for tok, role in ((tokenizer, "student"), (teacher_tokenizer, "teacher")):
        require_template(tok, role)
        if not getattr(tok, "is_fast", False):
            raise DataError(
                f"the {role} tokenizer is not a fast (Rust) tokenizer; chat across tokenizers needs offsets"
            )

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [
            encode_pair(tokenizer, teacher_tokenizer, m, loss_on, f"conversation {i}")
            for m, i in zip(batch["messages"], indices, strict=True)
        ]
        return {k: [r[k] for r in rows] for k in PAIR_ROW_FEATURES}

    templates = hashlib.sha256(f"{tokenizer.chat_template}|{teacher_tokenizer.chat_template}".encode())
    key = cache_key(
        "chat_pair",
        dataset_fingerprint(convs),
        tokenizer_fingerprint(tokenizer),
        tokenizer_fingerprint(teacher_tokenizer),
        templates.hexdigest()[:16],
        loss_on,
    )
    return convs.map(
        encode,
        batched=True,
        with_indices=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=convs.column_names,
        features=PAIR_ROW_FEATURES,
        new_fingerprint=key,
        desc="rendering conversations (two templates)",
    )
