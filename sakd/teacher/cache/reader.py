"""Reading a teacher cache lazily: a block (or a range of positions) at a time, from shards opened with
``safetensors.safe_open`` (memory-mapped; only the ranges asked for are read). A shard is checked against
its manifest record (size and SHA-256) before a run reads it (:meth:`CacheReader.verify` at start, or the
first time this process opens it), and refused in one line if it does not match.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from sakd.errors import DataError
from sakd.teacher.cache.manifest import SignalSpec
from sakd.teacher.cache.shardfile import BlockSignal, block_bounds, decode_block
from sakd.teacher.cache.verify import shard_problem

_RECENT_BLOCKS = 8  # neighbouring student blocks often read the same teacher block


class CacheReader:
    """Random access to the blocks and positions of the cache at ``root`` (its manifest already read)."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]) -> None:
        self.root, self.manifest = Path(root), manifest
        self.spec = SignalSpec.from_dict(manifest["signal"])
        self.blocks_per_shard = int(manifest["layout"]["blocks_per_shard"])
        self.num_blocks = int(manifest["layout"]["blocks"])
        self._handles: dict[int, Any] = {}
        self._recent: OrderedDict[int, BlockSignal] = OrderedDict()
        self._bounds: dict[str, Tensor] | None = None
        self._verified: set[int] = set()

    def _refuse(self, problem: str) -> DataError:
        return DataError(
            f"teacher cache {self.root} fails verification: {problem}; "
            f"`sakd cache-teacher --verify {self.root}` lists every bad shard (regenerate them)"
        )

    def verify(self) -> None:
        """Check every shard (present, recorded size, SHA-256) before a run starts: the sizes of all first
        (a truncated shard is named at once), then the hashes."""
        for hash_it in (False, True):
            for record in self.manifest["shards"]:
                problem = shard_problem(self.root, record, hash_it=hash_it)
                if problem:
                    raise self._refuse(problem)
        self._verified = set(range(len(self.manifest["shards"])))

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            problem = (
                None if shard in self._verified else shard_problem(self.root, self.manifest["shards"][shard])
            )
            if problem:
                raise self._refuse(problem)
            self._handles[shard] = safe_open(str(self.root / self.manifest["shards"][shard]["file"]), "pt")
        return self._handles[shard]

    def _locate(self, block: int) -> tuple[Any, int]:
        if not 0 <= block < self.num_blocks:
            raise DataError(
                f"teacher cache {self.root} holds blocks 0..{self.num_blocks - 1}; block {block} asked"
            )
        shard = block // self.blocks_per_shard
        return self._handle(shard), block - shard * self.blocks_per_shard

    def block(self, block: int) -> BlockSignal:
        """The decoded signal of one teacher block."""
        if block in self._recent:
            self._recent.move_to_end(block)
            return self._recent[block]
        handle, j = self._locate(block)
        out = decode_block(handle, j, self.spec)
        self._recent[block] = out
        if len(self._recent) > _RECENT_BLOCKS:
            self._recent.popitem(last=False)
        return out

    def char_ends(self, block: int) -> Tensor:
        """``[L]`` int64 global character ends of a block's tokens (reads nothing else)."""
        handle, j = self._locate(block)
        n = self.spec.block_size
        base = int(handle.get_slice("char_base")[j : j + 1][0])
        return handle.get_slice("char_end")[j * n : (j + 1) * n].to(torch.int64) + base

    def bounds(self) -> dict[str, Tensor]:
        """``[blocks]`` tensors over the whole cache: char_base, char_last, follows_previous."""
        if self._bounds is None:
            parts = [block_bounds(self._handle(s)) for s in range(len(self.manifest["shards"]))]
            self._bounds = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self._bounds

    def positions(self, lo: int, hi: int) -> dict[str, Tensor | None]:
        """The per-position fields of cache positions ``[lo, hi)`` (global, ``block * L + offset``)."""
        n = self.spec.block_size
        names = ("indices", "logprobs", "counts", "tail", "next_logprob", "router", "token_ids", "kept")
        parts: dict[str, list[Tensor]] = {k: [] for k in names}
        for b in range(lo // n, -(-hi // n)):
            blk = self.block(b)
            rows = slice(max(lo - b * n, 0), min(hi - b * n, n))
            for k in names:
                value = getattr(blk, k)
                if value is not None:
                    parts[k].append(value[rows])
        return {k: torch.cat(v) if v else None for k, v in parts.items()}
