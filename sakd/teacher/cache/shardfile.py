"""One shard file of a teacher cache: the stored signal of consecutive teacher blocks, as safetensors.

Why safetensors: a shard is a handful of flat tensors that ``safe_open(...).get_slice`` reads by range
without loading the rest (a training step reads its blocks only), the format is the one the project
already uses for weights, has no pickle, and its bytes are a pure function of the tensors (so a shard's
SHA-256 is reproducible: 1 process and 2 processes write identical files). Arrow via ``datasets`` would
also read lazily, but would keep the ragged sampled entries as list columns and add a second format.

Tensors of a shard with ``W`` blocks of ``L`` positions (``b`` = ``index_bits``, ``vd`` = values dtype):

=================  ====================  ==========================================================
name               shape, dtype          meaning
=================  ====================  ==========================================================
block_index        [W] int64             global block ids
char_base          [W] int64             global character where each block's text starts
char_last          [W] int64             character end of each block's last token
follows_previous   [W] uint8             1: the block continues the previous block's token stream
char_end           [W*L] uint16/uint32   each token's character end, relative to its char_base
token_ids          [W*ceil(L*b/8)] uint8 the teacher's tokens, b bits each (bitpack)
next_logprob       [W*L] vd              log p(next token of the stream), NaN where unknown
values             [W*L, K] vd           topk / topk_tail: log-probs of the top-k ids, best first
indices            uint8                 their ids, b bits each, ceil(L*K*b/8) bytes per block
tail               [W*L] float32         topk_tail: log of the teacher mass outside the top-k ids
slots              [W*L] uint8/uint16    sampled: distinct ids drawn at each position
values, counts     [E] vd, [E] uint8/16  sampled: log-prob and draw count of each distinct id
indices            uint8                 sampled: the ids, b bits each, packed per block
entry_offsets      [W+1] int64           sampled: first entry of each block
index_offsets      [W+1] int64           sampled: first byte of each block's ids
router             [W*L, layers, E] vd   optional: the MoE router's probabilities per layer
kept               [W*L] uint8           positions=kd: 1 where the position's signal is stored
row_offsets        [W+1] int64           positions=kd: first stored row of each block
=================  ====================  ==========================================================

With ``positions=kd`` (conversations: only the positions that carry KD) the per-row fields (``values``,
top-k ``indices`` -- then with ``index_offsets`` --, ``tail``, ``slots``, ``router``) hold the kept rows
only; ``token_ids``, ``char_end`` and ``next_logprob`` still hold every position. A decoded block fills the
other rows with a placeholder (uniform over the first ids) that no run reads: ``kept`` masks them out.

Log-probs are ``log_softmax(z / T)`` of the full teacher logits z at the cache temperature T.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sakd.teacher.cache.bitpack import pack_bits, packed_size, unpack_bits
from sakd.teacher.cache.manifest import FORMAT, FORMAT_VERSION, SignalSpec

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INT_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16}


@dataclass
class BlockSignal:
    """The decoded signal of one teacher block of ``L`` positions (``S`` id slots per position)."""

    index: int
    token_ids: Tensor  # [L] int64
    char_base: int
    char_end: Tensor  # [L] int64, global
    follows_previous: bool
    next_logprob: Tensor  # [L] float32
    indices: Tensor  # [L, S] int64
    logprobs: Tensor  # [L, S] float32
    counts: Tensor | None = None  # [L, S] int64 (sampled; 0 = padding)
    tail: Tensor | None = None  # [L] float32 (topk_tail)
    router: Tensor | None = None  # [L, layers, experts] float32
    kept: Tensor | None = None  # [L] bool: the positions whose signal is stored (positions=kd), else None


def _cat(blocks: list[BlockSignal], name: str) -> Tensor:
    return torch.cat([getattr(b, name).reshape(-1, *getattr(b, name).shape[1:]) for b in blocks])


def encode_shard(blocks: list[BlockSignal], spec: SignalSpec) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and header metadata of a shard holding ``blocks`` (in order)."""
    vd, bits = DTYPES[spec.values_dtype], spec.index_bits
    rel = torch.stack([b.char_end - b.char_base for b in blocks])
    out: dict[str, Tensor] = {
        "block_index": torch.tensor([b.index for b in blocks], dtype=torch.int64),
        "char_base": torch.tensor([b.char_base for b in blocks], dtype=torch.int64),
        "char_last": torch.tensor([int(b.char_end[-1]) for b in blocks], dtype=torch.int64),
        "follows_previous": torch.tensor([b.follows_previous for b in blocks], dtype=torch.uint8),
        "char_end": rel.reshape(-1).to(torch.uint16 if int(rel.max()) < 1 << 16 else torch.uint32),
        "token_ids": torch.cat([pack_bits(b.token_ids, bits) for b in blocks]),
        "next_logprob": _cat(blocks, "next_logprob").to(vd),
    }
    kd = spec.positions == "kd"
    kept = [
        b.kept if kd and b.kept is not None else torch.ones(len(b.token_ids), dtype=torch.bool)
        for b in blocks
    ]

    def rows(name: str) -> Tensor:
        return torch.cat([getattr(b, name)[k] for b, k in zip(blocks, kept, strict=True)])

    if kd:
        out["kept"] = torch.cat(kept).to(torch.uint8)
        out["row_offsets"] = torch.tensor([0, *torch.stack([k.sum() for k in kept]).cumsum(0).tolist()])
    if spec.mode == "sampled":
        out.update(_encode_sampled(blocks, spec, kept))
    else:
        out["values"] = rows("logprobs").to(vd)
        packed = [pack_bits(b.indices[k], bits) for b, k in zip(blocks, kept, strict=True)]
        out["indices"] = torch.cat(packed)
        if kd:
            out["index_offsets"] = torch.tensor(
                [0, *torch.tensor([p.numel() for p in packed]).cumsum(0).tolist()]
            )
        if spec.mode == "topk_tail":
            out["tail"] = rows("tail").to(torch.float32)
    if spec.router_shape is not None:
        out["router"] = rows("router").to(vd)
    # one metadata key: safetensors writes its metadata map in no fixed order, which would change the bytes
    meta = {"sakd": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "mode": spec.mode})}
    return {k: v.contiguous() for k, v in out.items()}, meta


def _encode_sampled(blocks: list[BlockSignal], spec: SignalSpec, kept: list[Tensor]) -> dict[str, Tensor]:
    cd = INT_DTYPES[spec.count_dtype]
    slots, values, counts, packed, entries, offsets = [], [], [], [], [0], [0]
    for b, k in zip(blocks, kept, strict=True):
        drawn = (b.counts > 0) & k[:, None]
        slots.append(drawn.sum(-1)[k])
        values.append(b.logprobs[drawn])
        counts.append(b.counts[drawn])
        packed.append(pack_bits(b.indices[drawn], spec.index_bits))
        entries.append(entries[-1] + int(drawn.sum()))
        offsets.append(offsets[-1] + packed[-1].numel())
    return {
        "slots": torch.cat(slots).to(cd),
        "values": torch.cat(values).to(DTYPES[spec.values_dtype]),
        "counts": torch.cat(counts).to(cd),
        "indices": torch.cat(packed),
        "entry_offsets": torch.tensor(entries, dtype=torch.int64),
        "index_offsets": torch.tensor(offsets, dtype=torch.int64),
    }


def _range(handle: Any, name: str, lo: int, hi: int) -> Tensor:
    return handle.get_slice(name)[lo:hi]


def block_count(handle: Any) -> int:
    return int(handle.get_slice("block_index").get_shape()[0])


def block_bounds(handle: Any) -> dict[str, Tensor]:
    """The per-block header of a shard: index, character range, stream continuity."""
    return {k: handle.get_tensor(k) for k in ("block_index", "char_base", "char_last", "follows_previous")}


def decode_block(handle: Any, j: int, spec: SignalSpec) -> BlockSignal:
    """Block ``j`` of the shard open as ``handle`` (a ``safetensors.safe_open``), read by range."""
    n, bits = spec.block_size, spec.index_bits
    lo, hi = j * n, (j + 1) * n
    base = int(_range(handle, "char_base", j, j + 1)[0])
    tok_bytes = packed_size(n, bits)
    block = BlockSignal(
        index=int(_range(handle, "block_index", j, j + 1)[0]),
        token_ids=unpack_bits(_range(handle, "token_ids", j * tok_bytes, (j + 1) * tok_bytes), bits, n),
        char_base=base,
        char_end=_range(handle, "char_end", lo, hi).to(torch.int64) + base,
        follows_previous=bool(_range(handle, "follows_previous", j, j + 1)[0]),
        next_logprob=_range(handle, "next_logprob", lo, hi).float(),
        indices=torch.empty(0),
        logprobs=torch.empty(0),
    )
    if spec.positions == "kd":
        _decode_kept(handle, j, spec, block)
        return block
    if spec.mode == "sampled":
        _decode_sampled(handle, j, spec, block)
    else:
        k = int(spec.top_k)
        idx_bytes = packed_size(n * k, bits)
        block.logprobs = _range(handle, "values", lo, hi).float()
        raw = _range(handle, "indices", j * idx_bytes, (j + 1) * idx_bytes)
        block.indices = unpack_bits(raw, bits, n * k).reshape(n, k)
        if spec.mode == "topk_tail":
            block.tail = _range(handle, "tail", lo, hi).float()
    if spec.router_shape is not None:
        block.router = _range(handle, "router", lo, hi).float()
    return block


def _decode_kept(handle: Any, j: int, spec: SignalSpec, block: BlockSignal) -> None:
    """The per-row fields of a ``positions=kd`` block: its kept rows, the placeholder elsewhere."""
    n, s = spec.block_size, spec.slots
    kept = _range(handle, "kept", j * n, (j + 1) * n).bool()
    r0, r1 = (int(x) for x in _range(handle, "row_offsets", j, j + 2))
    block.kept = kept
    block.indices = (torch.arange(s) % spec.vocab_size).expand(n, s).clone()
    block.logprobs = torch.full((n, s), -math.log(s))
    if spec.mode == "sampled":
        stored = BlockSignal(**{**block.__dict__})
        _decode_sampled(handle, j, spec, stored, rows=(r0, r1))
        block.counts = torch.ones(n, s, dtype=torch.int64)
        block.indices[kept], block.logprobs[kept], block.counts[kept] = (
            stored.indices,
            stored.logprobs,
            stored.counts,
        )
    else:
        b0, b1 = (int(x) for x in _range(handle, "index_offsets", j, j + 2))
        ids = unpack_bits(_range(handle, "indices", b0, b1), spec.index_bits, (r1 - r0) * s)
        block.indices[kept] = ids.reshape(r1 - r0, s)
        block.logprobs[kept] = _range(handle, "values", r0, r1).float()
        if spec.mode == "topk_tail":
            block.tail = torch.full((n,), float("-inf"))
            block.tail[kept] = _range(handle, "tail", r0, r1).float()
    if spec.router_shape is not None:
        block.router = torch.zeros(n, *spec.router_shape)
        block.router[kept] = _range(handle, "router", r0, r1).float()


def _decode_sampled(
    handle: Any, j: int, spec: SignalSpec, block: BlockSignal, rows: tuple[int, int] | None = None
) -> None:
    """Block ``j``'s drawn ids, log-probs and counts; ``rows``: its stored rows (``positions=kd``)."""
    s = spec.slots
    r0, r1 = rows or (j * spec.block_size, (j + 1) * spec.block_size)
    n = r1 - r0
    e0, e1 = (int(x) for x in _range(handle, "entry_offsets", j, j + 2))
    b0, b1 = (int(x) for x in _range(handle, "index_offsets", j, j + 2))
    slots = _range(handle, "slots", r0, r1).to(torch.int64)
    row = torch.repeat_interleave(torch.arange(n), slots)
    col = torch.arange(e1 - e0) - torch.repeat_interleave(torch.cumsum(slots, 0) - slots, slots)
    ids = unpack_bits(_range(handle, "indices", b0, b1), spec.index_bits, e1 - e0)
    block.indices = torch.zeros(n, s, dtype=torch.int64).index_put_((row, col), ids)
    block.logprobs = torch.zeros(n, s).index_put_((row, col), _range(handle, "values", e0, e1).float())
    counts = _range(handle, "counts", e0, e1).to(torch.int64)
    block.counts = torch.zeros(n, s, dtype=torch.int64).index_put_((row, col), counts)
