"""Which cached teacher positions serve each student block, and the teacher signal of a batch.

Two layouts:

* **same blocks** -- the student has the teacher's tokenizer and block size: its training block ``i`` *is*
  cache block ``i`` (both are :func:`sakd.data.packing.pack` of the same documents), and every position has
  its teacher distribution, exactly as in online same-tokenizer KD. Each batch's tokens are compared with
  the cached ones (a mismatch is one line, never silent garbage).
* **aligned** -- any other student tokenizer (or block size): the student's blocks are aligned with the
  cached teacher positions by character ends, as online cross-tokenizer KD aligns them
  (:func:`sakd.align.positions.align_spans`: anchors where both tokens end on the same character; the
  teacher tokens between two anchors spell the student's next token, scored by the chain rule from the
  stored next-token log-probs). The per-block alignment is computed once with ``datasets.map`` (cached on
  disk by a fingerprint of the cache and the student tokenizer).

The teacher saw the text in its own blocks, so at an anchor its context starts at its block's start,
where online cross-tokenizer KD starts it at the student block's start.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Any

import datasets
import numpy as np
import torch
from torch import Tensor

from sakd.align.positions import align_spans, span_logprob
from sakd.errors import DataError
from sakd.losses import SparseTeacher
from sakd.teacher.cache.blocks import BlockStream
from sakd.teacher.cache.reader import CacheReader


def _truncate(sparse: SparseTeacher, k: int | None) -> SparseTeacher:
    """The first ``k`` of the stored top ids (best first); their dropped mass joins the tail."""
    if k is None or k >= sparse.indices.shape[-1] or sparse.counts is not None:
        return sparse
    tail = None
    if sparse.tail_logprob is not None:
        dropped = torch.logsumexp(sparse.logprobs[..., k:], dim=-1)
        tail = torch.logaddexp(sparse.tail_logprob, dropped)
    return SparseTeacher(sparse.indices[..., :k], sparse.logprobs[..., :k], sparse.temperature, None, tail)


def stored_sparse(fields: dict[str, Tensor | None], temperature: float, top_k: int | None) -> SparseTeacher:
    sparse = SparseTeacher(
        indices=fields["indices"],
        logprobs=fields["logprobs"],
        temperature=temperature,
        counts=fields["counts"],
        tail_logprob=fields["tail"],
    )
    return _truncate(sparse, top_k)


def same_block_fields(reader: CacheReader, sample_ids: Tensor, input_ids: Tensor) -> dict[str, Tensor | None]:
    """The stacked per-position fields of cache blocks ``sample_ids`` (``[B, L, ...]``), checked against
    the batch's tokens."""
    blocks = [reader.block(int(i)) for i in sample_ids]
    for row, blk in zip(input_ids.cpu(), blocks, strict=True):
        if not torch.equal(row, blk.token_ids):
            raise DataError(
                f"training block {blk.index} holds other tokens than teacher cache block {blk.index} of "
                f"{reader.root}: the run's data or packing differs from the cache's; regenerate the cache"
            )
    fields: dict[str, Tensor | None] = {}
    for k, attr in (("indices", "indices"), ("logprobs", "logprobs"), ("counts", "counts"), ("tail", "tail")):
        values = [getattr(b, attr) for b in blocks]
        fields[k] = None if values[0] is None else torch.stack(values)
    fields["router"] = None if blocks[0].router is None else torch.stack([b.router for b in blocks])
    fields["kept"] = None if blocks[0].kept is None else torch.stack([b.kept for b in blocks])
    return fields


class BlockAligner:
    """Per student block (as ``pack`` cuts them), the cached teacher positions ``[cache_lo, cache_hi)``
    whose tokens end inside the block's text, with ``anchor`` / ``span_end`` relative to ``cache_lo`` (see
    :mod:`sakd.align.positions`): the function :meth:`BlockStream.map_blocks` maps."""

    def __init__(self, reader: CacheReader) -> None:
        self.reader = reader
        b = reader.bounds()
        self.char_base, self.char_last = b["char_base"].tolist(), b["char_last"].tolist()
        self.follows = b["follows_previous"].bool().tolist()

    def teacher_positions(self, lo_char: int, hi_char: int) -> tuple[int, list[int], set[int]]:
        """First cached position whose token ends in ``(lo_char, hi_char]``, the character ends of all of
        them, and the relative indices ``k`` after which the token stream breaks (between cache blocks
        that do not follow each other)."""
        n = self.reader.spec.block_size
        first, ends, breaks = -1, [], set()
        w = bisect.bisect_right(self.char_last, lo_char)
        while w < len(self.char_base) and self.char_base[w] < hi_char:
            e = self.reader.char_ends(w)
            sel = ((e > lo_char) & (e <= hi_char)).nonzero().squeeze(-1)
            if sel.numel():
                if first < 0:
                    first = w * n + int(sel[0])
                elif not self.follows[w]:
                    breaks.add(len(ends) - 1)
                ends.extend(e[sel].tolist())
            w += 1
        return max(first, 0), ends, breaks

    def __call__(self, blocks: list[dict[str, Any]]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("input_ids", "cache_lo", "cache_hi", "anchor", "span_end")}
        for blk in blocks:
            s_ends = blk["char_end"].tolist()
            start, t_ends, breaks = self.teacher_positions(blk["char_base"], s_ends[-1])
            al = align_spans([(0, e) for e in s_ends], [(0, e) for e in t_ends])
            anchor, span_end = al.anchor, al.span_end
            for k in breaks:  # the teacher tokens of a span must be one unbroken stretch of its stream
                span_end = torch.where((anchor <= k) & (span_end > k), -1, span_end)
            if "anchorable" in blk:  # conversations: only content positions (sakd.data.chat_pair)
                keep = torch.as_tensor(blk["anchorable"]) > 0
                anchor, span_end = torch.where(keep, anchor, -1), torch.where(keep, span_end, -1)
            out["input_ids"].append(blk["input_ids"])
            out["cache_lo"].append(start)
            out["cache_hi"].append(start + len(t_ends))
            out["anchor"].append(anchor.tolist())
            out["span_end"].append(span_end.tolist())
        return out


def aligned_index(
    docs: datasets.Dataset,
    tokenizer: Any,
    block_size: int,
    reader: CacheReader,
    key: str,
    rows: datasets.Dataset | None = None,
) -> Any:
    """The aligned layout's per-block index over ``docs`` (torch format); ``key`` names the pairing for
    ``datasets``' cache (the cache's manifest and the student tokenizer); ``rows``: the student's
    conversations (:func:`sakd.data.chat_pair.tokenize_conversation_ends`), aligned on the contents."""
    what = docs._fingerprint if rows is None else rows._fingerprint
    fingerprint = hashlib.sha256(f"sakd-cache-align:{key}:{block_size}:{what}".encode()).hexdigest()
    index = BlockStream(docs, tokenizer, block_size, rows).map_blocks(BlockAligner(reader), fingerprint[:32])
    return index.with_format("torch")


def aligned_fields(
    reader: CacheReader, rows: dict[str, Tensor], chain_rule: bool
) -> tuple[dict[str, Tensor | None], Tensor, Tensor | None]:
    """The stacked fields at each student position's anchor (``[B, Ls, ...]``), the KD mask ``[B, Ls]`` and
    the chain-rule log-probs of multi-token next tokens (``[B, Ls]``, NaN elsewhere) of index ``rows``."""
    per_row: list[dict[str, Tensor | None]] = []
    chain: list[Tensor] = []
    slots = reader.spec.slots
    for lo, hi, anchor, span_end in zip(
        rows["cache_lo"], rows["cache_hi"], rows["anchor"], rows["span_end"], strict=True
    ):
        lo, hi = int(lo), int(hi)
        anchor = anchor.long()
        if hi <= lo:  # no teacher token ends inside this block's text
            per_row.append(_empty(anchor.shape[0], slots, reader))
            chain.append(torch.full(anchor.shape, float("nan")))
            continue
        fields = reader.positions(lo, hi)
        at = anchor.clamp_min(0)
        per_row.append({k: None if v is None else v[at] for k, v in fields.items()})
        multi = (span_end > anchor + 1) & (anchor >= 0)
        lp = span_logprob(fields["next_logprob"][None], anchor[None], torch.where(multi, span_end, -1)[None])
        chain.append(lp[0].float())
    stacked = {k: None if per_row[0][k] is None else torch.stack([r[k] for r in per_row]) for k in per_row[0]}
    kd_mask = torch.stack([a >= 0 for a in rows["anchor"]])
    if stacked.get("kept") is not None:  # positions=kd: an anchor whose teacher position was not stored
        kd_mask &= stacked["kept"]
    return stacked, kd_mask, torch.stack(chain) if chain_rule else None


def _empty(length: int, slots: int, reader: CacheReader) -> dict[str, Tensor | None]:
    """Fields for a block without teacher positions: a uniform stand-in (its positions are masked out)."""
    spec = reader.spec
    return {
        "indices": (torch.arange(slots) % spec.vocab_size).expand(length, slots).clone(),
        "logprobs": torch.full((length, slots), -float(np.log(slots))),
        "counts": torch.ones(length, slots, dtype=torch.int64) if spec.mode == "sampled" else None,
        "tail": torch.full((length,), float("-inf")) if spec.mode == "topk_tail" else None,
        "next_logprob": torch.zeros(length),
        "router": None if spec.router_shape is None else torch.zeros(length, *spec.router_shape),
        "token_ids": torch.zeros(length, dtype=torch.int64),
        "kept": None if spec.positions == "all" else torch.zeros(length, dtype=torch.bool),
    }
