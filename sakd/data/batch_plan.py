"""The batch order: which blocks each rank reads at each optimizer step.

The batch order is a pure function of (seed, epoch, optimizer step): optimizer step ``s`` consumes
the global slice ``order[s*G:(s+1)*G]`` with ``G = micro_batch * accumulation * world_size``, and
micro-batch ``m`` of rank ``r`` takes ``b`` consecutive blocks of it.  So the blocks of one
optimizer step do not depend on how they are split into micro-batches or ranks (1x8 == 4x2 ==
2 ranks x 4), and a resumed run continues from exactly the next block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=2)
def _epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The block order of one epoch (cached: it is asked for at every optimizer step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_blocks, generator=g)


@dataclass(frozen=True)
class BatchPlan:
    """Which blocks each rank reads at each optimizer step (see the module docstring)."""

    num_blocks: int
    micro_batch: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def blocks_per_step(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_blocks // self.blocks_per_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return _epoch_order(self.num_blocks, self.seed, epoch)

    def micro_batches(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """The ``accumulation`` micro-batches (block indices) of one optimizer step on ``rank``."""
        order = self.epoch_order(epoch)
        start = step_in_epoch * self.blocks_per_step
        out = []
        for m in range(self.accumulation):
            lo = start + (m * self.world_size + rank) * self.micro_batch
            out.append(order[lo : lo + self.micro_batch].tolist())
        return out
