"""Held-out text as one token stream (:class:`TokenStream`): what evaluation scores, window by window.

Evaluation needs more than blocks: the strided method reads windows that overlap block boundaries,
and bits per byte needs the UTF-8 bytes of text behind every scored token. A stream is the documents'
tokens in order, each followed by the tokenizer's EOS, with those byte counts (EOS: 0 bytes).

The EOS after a document is there because documents are packed into one stream; the text has none.
Predicting it is never scored -- in training (:func:`sakd.data.make_batch` sets its label to -100) and
in evaluation alike -- so losses, perplexities and bits per byte are over the text's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from transformers import PreTrainedTokenizerBase

from sakd.data.tokenize import tokenize_documents


@dataclass(frozen=True)
class TokenStream:
    """Tokens of held-out text in order.

    Attributes:
        ids: ``[N]`` int64 token ids (documents joined by EOS).
        nbytes: ``[N]`` int64 UTF-8 bytes of text each token covers (0 for EOS), or None (no bits per byte).
        eos_id: the EOS that separates documents: a target that is never scored (None: no EOS).
        documents: how many documents the text held (None when unknown, e.g. from packed blocks).
        positions: ``[N]`` each token's index inside its document, or None: with them every window keeps
            attention inside each document and a document's first token is not scored (within-document
            packing, :mod:`sakd.data.documents`).
        targets: ``[N]`` bool, which tokens are targets (conversations: the assistant's), or None: all but
            the packing EOS.
    """

    ids: torch.Tensor
    nbytes: torch.Tensor | None
    eos_id: int | None
    documents: int | None = None
    positions: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.ids.numel())

    def scored(self) -> torch.Tensor:
        """``[N]`` bool: tokens that count as targets (all but the packing EOS, or ``targets``; with
        ``positions`` never a document's first token)."""
        if self.targets is not None:
            out = self.targets.bool().clone()
        elif self.eos_id is None:
            out = torch.ones_like(self.ids, dtype=torch.bool)
        else:
            out = self.ids != self.eos_id
        if self.positions is not None:
            out &= self.positions != 0
        return out

    def prefix(self, n_tokens: int) -> TokenStream:
        """The first ``n_tokens`` tokens."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:n_tokens]

        return TokenStream(
            self.ids[:n_tokens],
            cut(self.nbytes),
            self.eos_id,
            self.scored_documents(n_tokens),
            cut(self.positions),
            cut(self.targets),
        )

    def scored_documents(self, n_tokens: int) -> int | None:
        """How many documents have a scored token among the first ``n_tokens`` (None when unknown)."""
        if self.documents is None or n_tokens >= len(self):
            return self.documents
        if self.positions is not None:
            starts = self.positions[:n_tokens] == 0
        elif self.eos_id is not None:  # a document starts after each packing EOS
            starts = torch.zeros(min(n_tokens, len(self)), dtype=torch.bool)
            starts[1:] = self.ids[: n_tokens - 1] == self.eos_id
        else:
            return None
        starts[:1] = True
        doc = starts.long().cumsum(0)
        return int(doc[self.scored()[:n_tokens]].unique().numel())

    @classmethod
    def from_blocks(cls, blocks: Any, eos_id: int | None) -> TokenStream:
        """The stream of packed blocks (``input_ids`` [+ ``byte_counts``, ``position``, ``target``] rows, or
        an ``[N, L]`` tensor) laid end to end: consecutive blocks are consecutive stretches of one stream."""
        if isinstance(blocks, torch.Tensor):
            return cls(blocks.reshape(-1).long(), None, eos_id)
        rows = blocks.with_format("arrow")[:]

        def flat(name: str) -> torch.Tensor | None:
            if name not in rows.column_names:
                return None
            return torch.from_numpy(pc.list_flatten(rows[name]).to_numpy().astype(np.int64))

        return cls(flat("input_ids"), flat("byte_counts"), eos_id, None, flat("position"), flat("target"))


def text_stream(
    docs: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, num_proc: int = 1
) -> TokenStream:
    """All of ``docs`` (a ``text`` column) as one stream, with byte counts (nothing left out)."""
    rows = tokenize_documents(docs, tokenizer, with_bytes=True, num_proc=num_proc).with_format("arrow")[:]
    ids = pc.list_flatten(rows["input_ids"]).to_numpy().astype(np.int64)
    nbytes = pc.list_flatten(rows["byte_counts"]).to_numpy().astype(np.int64)
    return TokenStream(torch.from_numpy(ids), torch.from_numpy(nbytes), tokenizer.eos_token_id, len(docs))
