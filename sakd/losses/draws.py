"""Where the ``sampled`` mode's draws come from: one random stream per block, seeded with ``(seed, block id)``
and consumed a fixed chunk of :data:`ROWS_PER_CHUNK` positions at a time, in order. A position's draws are
then a function of the seed, its block and its place in the block only -- not of the chunk size of the loss,
of how a step is split into micro-batches, or of the rank. An offline cache
(:mod:`sakd.teacher.cache.extract`) and the on-the-fly ``sampled`` mode (:func:`draw_blocks`, used by
:func:`sakd.losses.fused_distill` when it is given :class:`BlockDraws`) use these same streams.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .sparse import SparseTeacher, sample_teacher

ROWS_PER_CHUNK = 256  # part of the sampled mode's definition: the draws of a block are made in these chunks


def block_generator(seed: int, block: int, device: torch.device) -> torch.Generator:
    """The sampled mode's generator of block ``block``: seeded from a hash of ``(seed, block)``, so no two
    pairs share a stream (an affine ``seed·c + block`` gives ``(s, b + c)`` the stream of ``(s + 1, b)``)."""
    digest = hashlib.sha256(f"sampled/{seed}/{block}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class BlockDraws:
    """The keys of the on-the-fly draws of a batch: ``blocks`` ``[B]`` the block id of each sequence (a
    batch's ``sample_ids``), whose positions are consecutive rows; ``seed`` the run's sampling seed."""

    seed: int
    blocks: Tensor


@torch.no_grad()
def draw_blocks(
    logprobs_of: Callable[[slice], Tensor],
    rows: int,
    draws: BlockDraws,
    num_samples: int,
    temperature: float,
    device: torch.device,
) -> SparseTeacher:
    """``num_samples`` draws (with counts, :func:`sample_teacher`) at each of ``rows`` positions, block by
    block from :func:`block_generator`.

    ``logprobs_of(r)``: the ``[len(r), V]`` teacher log-probs at temperature ``temperature`` of rows ``r``
    (rows ``b·L .. (b+1)·L`` are block ``draws.blocks[b]``'s ``L = rows / B`` positions)."""
    b = draws.blocks.numel()
    if b == 0 or rows % b:
        raise ValueError(f"{rows} rows do not split into the {b} blocks of the draws")
    per = rows // b
    parts = []
    for i, block in enumerate(draws.blocks.reshape(-1).tolist()):
        gen = block_generator(draws.seed, int(block), device)
        for lo in range(0, per, ROWS_PER_CHUNK):
            r = slice(i * per + lo, i * per + min(lo + ROWS_PER_CHUNK, per))
            parts.append(sample_teacher(logprobs_of(r), num_samples, temperature=1.0, generator=gen))
    return SparseTeacher(
        indices=torch.cat([p.indices for p in parts]),
        logprobs=torch.cat([p.logprobs for p in parts]),
        temperature=temperature,
        counts=torch.cat([p.counts for p in parts]),
    )
