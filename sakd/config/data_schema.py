"""The ``data`` section of a run: where the text or conversations come from, what a document is, how
documents are packed into blocks (README: "Text in, numbers out", "Distilling a chat model")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sakd.config.fields import documented as _f
from sakd.errors import ConfigError

SAMPLE_BY = ("document", "paragraph", "line")
"""What one document of a .txt file can be (the ``sample_by`` option of ``datasets``' text loader)."""
DATA_FORMATS = ("text", "chat")
LOSS_ON = ("assistant", "all")
PACKING = ("cross_document", "within_document")


@dataclass
class DataConfig:
    train: str | None = _f(
        None,
        "Training text: a local .txt (documents as `sample_by` says), .jsonl/.json or .parquet file (one "
        "document per record), or a datasets hub name (loaded with datasets.load_dataset).",
    )
    sample_by: str = _f(
        "document",
        "What one document of a .txt file is (datasets' text loader option): document = the whole file, "
        "paragraph = blank-line separated, line = each line. Line breaks inside a document are kept; EOS "
        "goes only after a document. .jsonl/.parquet/hub records are always one document each.",
        choices=list(SAMPLE_BY),
    )
    dataset_config: str | None = _f(None, "Hub dataset configuration name (e.g. wikitext-2-raw-v1).")
    split: str = _f("train", "Split of `train` to read.")
    text_field: str = _f("text", "Column holding the text in .jsonl/.parquet/hub datasets.")
    format: str = _f(
        "text",
        "text: documents of plain text (`text_field`); chat: conversations, a list of {role, content} "
        "messages per record (`messages_field`; roles system/user/assistant), each rendered by each model's own "
        "chat template.",
        choices=list(DATA_FORMATS),
    )
    messages_field: str = _f("messages", "Column holding the conversation when format=chat.")
    loss_on: str = _f(
        "assistant",
        "format=chat: which tokens are targets (CE, KD, auxiliary terms, evaluation). assistant = the "
        "assistant turns' tokens including the template's end-of-turn token; all = every token of the "
        "rendered conversation.",
        choices=list(LOSS_ON),
    )
    packing: str | None = _f(
        None,
        "cross_document: a block is a stretch of the token stream and attention runs across document "
        "boundaries; within_document: positions restart at each document start and attention stays inside "
        "each document (block-diagonal mask; flash-attention's varlen path on GPU). None: cross_document "
        "for text, within_document for chat.",
        choices=list(PACKING),
    )
    eval: str | None = _f(
        None, "Held-out text (same formats). Default: `eval_fraction` of the training documents."
    )
    eval_split: str = _f("train", "Split of `eval` to read.")
    eval_fraction: float = _f(
        0.05, "Share of training documents held out for evaluation when `eval` is not given.", gt=0, max=0.5
    )
    block_size: int = _f(256, "Tokens per packed training block (the seed's `max_length`).", min=8)
    max_train_blocks: int | None = _f(None, "Use at most this many training blocks (None: all).", min=1)
    max_eval_blocks: int | None = _f(256, "Evaluate on at most this many held-out blocks.", min=1)
    eval_stride: int | None = _f(
        None,
        "Held-out scoring: None = blocked (each block alone); N = strided (sliding windows of block_size "
        "tokens advanced N at a time, each token scored once with >= block_size - N tokens of context; "
        "block_size/N times the forwards). Must be <= block_size.",
        min=1,
    )
    num_proc: int = _f(
        1,
        "Processes for tokenizing and packing (datasets.map num_proc); results are cached on disk either way.",
        min=1,
    )

    def resolved_packing(self) -> str:
        """``packing``, or the format's default (within_document for chat, cross_document for text)."""
        if self.packing is not None:
            return self.packing
        return "within_document" if self.format == "chat" else "cross_document"


def check_chat(cfg: Any, *, caching: bool = False) -> None:
    """What conversations (``data.format: chat``) do not support yet, refused in one line each (``caching``:
    the recipe of ``sakd cache-teacher``, which takes conversations and documents kept apart)."""
    if cfg.data.format != "chat":
        return
    if cfg.distillation.policy != "off" and cfg.distillation.generation.prompts != "train":
        raise ConfigError(
            "data.format=chat takes on-policy prompts from the training conversations (cut at the last user "
            "turn): set distillation.generation.prompts=train"
        )
