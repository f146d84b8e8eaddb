"""Work on ``hidden @ head.T`` logits a chunk of rows at a time: the one place that walks over hidden
states so that a ``[N, V]`` logits tensor is never built (training CE, the teacher's chain-rule token
scores, held-out loss and agreement all go through :func:`over_chunks`).

The fused distillation loss (:mod:`sakd.losses.fused`) has its own loop: it writes logits into
preallocated buffers and computes gradients in closed form while it walks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Head:
    """An output head: ``weight`` ``[V', H]`` (V' >= ``vocab``), optional ``bias`` ``[V']``; only the first
    ``vocab`` rows are real tokens (a model's embedding matrix is often padded past its tokenizer)."""

    weight: Tensor
    bias: Tensor | None = None
    vocab: int | None = None

    def logits(self, hidden: Tensor, *, upcast: bool = False) -> Tensor:
        """``[n, vocab]`` logits of ``hidden`` ``[n, H]``; ``upcast`` computes them in at least float32
        (float64 stays float64)."""
        w = self.weight if self.vocab is None else self.weight[: self.vocab]
        b = self.bias if self.bias is None or self.vocab is None else self.bias[: self.vocab]
        if upcast:
            dtype = torch.promote_types(hidden.dtype, torch.float32)
            hidden, w, b = hidden.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        return F.linear(hidden, w, b)


def over_chunks(
    fn: Callable[[slice], Tensor],
    rows: int,
    chunk_size: int,
    *,
    combine: str = "sum",
    recompute: bool = False,
) -> Tensor:
    """``fn(rows_slice)`` for consecutive slices of ``chunk_size`` rows, summed (``combine="sum"``: each
    result has the same shape, e.g. a scalar or a few stacked sums) or concatenated along dim 0
    (``combine="cat"``: per-row results).

    ``fn`` builds its chunk's logits itself, so only one chunk of logits is alive at a time. With
    ``recompute`` (training) each chunk runs under activation checkpointing: its logits are dropped after
    the forward and rebuilt in backward, so peak extra memory stays ``O(chunk_size x V)`` with gradients.
    """
    if combine not in ("sum", "cat"):
        raise ValueError(f"combine must be 'sum' or 'cat', got {combine!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts: list[Tensor] = []
    total: Tensor | None = None
    for lo in range(0, rows, chunk_size):
        part_rows = slice(lo, min(lo + chunk_size, rows))
        part = checkpoint(fn, part_rows, use_reentrant=False) if recompute else fn(part_rows)
        if combine == "cat":
            parts.append(part)
        else:
            total = part if total is None else total + part
    if combine == "cat":
        return torch.cat(parts) if parts else torch.empty(0)
    return total if total is not None else torch.zeros(())
