"""Conversations in (``data.format: chat``): rows whose ``data.messages_field`` is a list of ``{role, content}``
messages (system, user, assistant; any number of turns), rendered by the model's own chat template
(``tokenizer.apply_chat_template``) and tokenized with a per-token ``target`` flag.

**Which tokens are targets** (``data.loss_on``): ``all`` -- every token of the rendered conversation;
``assistant`` (the default) -- the tokens of each assistant turn as the model would write them after the
template's generation prompt: the message's content *and the template's end-of-turn token* (ChatML's
``<|im_end|>``), so the model learns to stop. A token is an assistant token when it *ends* inside such a
span. The spans come from rendering the conversation prefix by prefix: assistant turn ``i`` spans from the
end of ``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])``,
trailing whitespace excluded (ChatML's ``\\n`` after ``<|im_end|>`` is not generated: a model stops at
``<|im_end|>``). A template that does not render conversations prefix by prefix is refused in one line.

**Bits per byte** of a conversation counts the UTF-8 bytes of the message contents its scored tokens cover
(``loss_on: assistant``: the assistant contents; ``all``: the whole rendered text): template text such as
``<|im_start|>assistant\\n`` or ``<|im_end|>`` covers no bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from sakd.data.stream import TokenStream
from sakd.data.text import load_records, select_field
from sakd.data.tokenize import IDS, cache_key, monotone_ends, tokenizer_fingerprint, utf8_prefix
from sakd.errors import DataError
from sakd.upstream import dataset_fingerprint

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Rendered:
    """One conversation as a model's template renders it: the text, the assistant turns' target spans
    (content + end-of-turn) and the character spans of every message's content, in that text."""

    text: str
    turns: list[tuple[int, int]]
    contents: list[tuple[int, int]]
    assistant_contents: list[tuple[int, int]]


def load_conversations(
    spec: str, *, split: str = "train", messages_field: str = "messages", dataset_config: str | None = None
) -> datasets.Dataset:
    """A dataset with one ``messages`` column, each row checked (:func:`check_conversation`)."""
    if spec.endswith((".txt", ".text")):
        raise DataError(
            f"data.format=chat reads rows with a '{messages_field}' field (.jsonl, .json, .parquet or a hub "
            f"dataset), not a .txt file: {spec}"
        )
    ds = select_field(
        load_records(spec, split=split, dataset_config=dataset_config),
        spec,
        messages_field,
        "data.messages_field",
    )
    if messages_field != "messages":
        ds = ds.rename_column(messages_field, "messages")
    for i, messages in enumerate(ds["messages"]):
        check_conversation(messages, f"{spec} row {i}")
    return ds


def check_conversation(messages: Any, where: str) -> None:
    """A one-line DataError unless ``messages`` is a list of {role, content} with known roles and at least
    one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: the conversation is not a non-empty list of {{role, content}} messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DataError(f"{where}: a message is not {{role, content}} with text content: {str(m)[:80]}")
        if m["role"] not in ROLES:
            raise DataError(
                f"{where}: unknown role {m['role']!r} (data.format=chat takes {', '.join(ROLES)})"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn (nothing to learn from): drop the row")


def require_template(tokenizer: PreTrainedTokenizerBase, role: str = "student") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the {role} tokenizer has no chat template (data.format=chat renders conversations with it): "
            "add one as chat_template in its tokenizer_config.json, or use data.format=text"
        )


def apply_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation: bool, where: str
) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # jinja errors (raise_exception in a template, bad roles)
        raise DataError(f"{where}: the chat template failed: {str(e).splitlines()[0]}") from None


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str = "a conversation"
) -> Rendered:
    """``messages`` rendered by ``tokenizer``'s chat template, with the spans of the module docstring."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = apply_template(tokenizer, messages, False, where)
    turns, contents, assistant = [], [], []
    prev = ""  # the rendering of the messages before message i
    for i, m in enumerate(messages):
        upto = apply_template(tokenizer, messages[: i + 1], False, where)
        if not (text.startswith(upto) and upto.startswith(prev)):
            raise DataError(f"{where}: the chat template does not render the conversation prefix by prefix")
        begin = len(prev)
        if m["role"] == "assistant":
            head = apply_template(tokenizer, messages[:i], True, where)
            if not (upto.startswith(head) and len(head) >= begin):
                raise DataError(
                    f"{where}: the chat template's generation prompt is not where turn {i} starts"
                )
            begin = len(head)
        start = upto.find(m["content"], begin)
        if start < 0:
            raise DataError(
                f"{where}: the chat template changes message {i}'s content (it cannot be located)"
            )
        contents.append((start, start + len(m["content"])))
        if m["role"] == "assistant":
            turns.append((begin, len(upto.rstrip())))
            assistant.append(contents[-1])
        prev = upto
    return Rendered(text, turns, contents, assistant)


def ends_inside(ends: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens (by end offset) that end inside one of ``spans`` (``start < end <= stop``)."""
    out = np.zeros(len(ends), dtype=bool)
    for a, b in spans:
        out |= (ends > a) & (ends <= b)
    return out


def content_bytes(text: str, ends: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """UTF-8 bytes of ``spans`` (message contents) each token covers (from the previous token's end to its
    own): they sum to the contents' bytes."""
    prefix = utf8_prefix(text)
    per_char = np.diff(prefix)
    keep = np.zeros(len(text), dtype=bool)
    for a, b in spans:
        keep[a:b] = True
    cum = np.concatenate([[0], np.cumsum(per_char * keep)])
    bounds = np.concatenate([[0], ends[:-1], [len(text)]]) if len(ends) else np.zeros(1, dtype=np.int64)
    return np.diff(cum[bounds]) if len(ends) else np.zeros(0, dtype=np.int64)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], loss_on: str, where: str = "a conversation"
) -> dict[str, np.ndarray]:
    """``input_ids``, ``target`` (1: a target under ``loss_on``) and ``byte_counts`` of one conversation."""
    return encode_rendered(tokenizer, messages, loss_on, where)[0]


def encode_rendered(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], loss_on: str, where: str = "a conversation"
) -> tuple[dict[str, np.ndarray], np.ndarray, Rendered]:
    """:func:`encode_conversation`'s row, plus each token's character end in the rendered text and the
    rendering itself (what the alignment across tokenizers, :mod:`sakd.data.chat_pair`, works from)."""
    r = render(tokenizer, messages, where)
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ends = monotone_ends(enc["offset_mapping"], len(r.text))
    if loss_on == "all":
        target, spans = np.ones(len(ends), dtype=bool), [(0, len(r.text))]
    else:
        target, spans = ends_inside(ends, r.turns), r.assistant_contents
    row = {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
        "target": target.astype(np.int8),
        "byte_counts": content_bytes(r.text, ends, spans),
    }
    return row, ends, r


def tokenize_conversations(
    convs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    loss_on: str = "assistant",
    num_proc: int = 1,
) -> datasets.Dataset:
    """One row per conversation (``input_ids``, ``target``, ``byte_counts``; no EOS is appended: the
    template ends every turn), cached on disk like :func:`sakd.data.tokenize.tokenize_documents`."""
    require_template(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "the student tokenizer is not a fast (Rust) tokenizer; chat targets need character offsets"
        )

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [
            encode_conversation(tokenizer, m, loss_on, f"conversation {i}")
            for m, i in zip(batch["messages"], indices, strict=True)
        ]
        return {k: [r[k] for r in rows] for k in ("input_ids", "target", "byte_counts")}

    template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]
    key = cache_key("chat", dataset_fingerprint(convs), tokenizer_fingerprint(tokenizer), template, loss_on)
    features = datasets.Features(
        {"input_ids": IDS, "target": datasets.List(datasets.Value("int8")), "byte_counts": IDS}
    )
    return convs.map(
        encode,
        batched=True,
        with_indices=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=convs.column_names,
        features=features,
        new_fingerprint=key,
        desc="rendering conversations",
    )


def chat_stream(
    convs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    loss_on: str = "assistant",
    num_proc: int = 1,
) -> TokenStream:
    """Conversations as one held-out stream: every conversation is its own document (positions restart),
    only ``loss_on`` tokens are scored, bytes are those of the message contents they cover."""
    rows = tokenize_conversations(convs, tokenizer, loss_on=loss_on, num_proc=num_proc).with_format("numpy")
    ids, targets, nbytes, positions = [], [], [], []
    for row in rows:
        ids.append(row["input_ids"])
        targets.append(row["target"])
        nbytes.append(row["byte_counts"])
        positions.append(np.arange(len(row["input_ids"])))

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    return TokenStream(cat(ids), cat(nbytes), None, len(convs), cat(positions), cat(targets).bool())
