"""The gradients the fused losses compute in their forward pass and hand out in backward.

The fused losses (:mod:`sakd.losses.chunk_loop`, :mod:`sakd.losses.fused_ce`) build the gradient of a *sum* over
positions while the forward runs, before the trainer's ``1 / tokens`` and any loss scale reach them. Two
consequences, both handled here:

- fp16 (DeepSpeed's fp16 engine): the sum's gradient of a frequent token's head row can pass fp16's 65,504 where
  the mean's, the one asked for, is small; a loss scaler cannot undo an overflow that happened before it applied.
  So an fp16 model's gradients are kept in float32 and cast to fp16 only after scaling. bf16 has float32's
  range and keeps its own dtype (half the memory).
- the upstream gradient (``1 / tokens``, times a loss scale) is applied as a Python float, in float32 arithmetic,
  then rounded once: multiplying by it rounded to bf16 first biased every gradient by up to 0.2 %.

The hidden states' gradient is per position (``|∂/∂z|₁ ≤ 2`` per row, so ``|g·W| ≤ 2·max|W|``): it is computed in
the head's own dtype, without a float32 copy of the head, and only stored in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a fused loss keeps a gradient of a ``dtype`` tensor in until backward."""
    return torch.float32 if dtype == torch.float16 else dtype


def zero_grads(tensors: Sequence[Tensor | None], needed: Sequence[bool]) -> list[Tensor | None]:
    """A zero buffer in :func:`kept_dtype` for each tensor that needs a gradient (None for the others)."""
    return [
        torch.zeros_like(t, dtype=kept_dtype(t.dtype)) if t is not None and need else None
        for t, need in zip(tensors, needed, strict=True)
    ]


def upstream_scaled(
    grads: Sequence[Tensor | None], grad_out: Tensor, dtypes: Sequence[torch.dtype | None]
) -> list[Tensor | None]:
    """The kept gradients times the upstream scalar gradient ``grad_out``, each cast to its tensor's dtype.

    Scales in place: the kept buffers are dead after a ``once_differentiable`` backward (a second backward
    through a retained graph fails on autograd's version check instead of reading them scaled)."""
    scale = float(grad_out)  # one host sync; a Python float multiplies in float32 arithmetic
    return [
        None if g is None or dtype is None else (g if scale == 1.0 else g.mul_(scale)).to(dtype)
        for g, dtype in zip(grads, dtypes, strict=True)
    ]
