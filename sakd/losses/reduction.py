"""Turning per-position losses into a scalar: masking, per-token weights, mean / sum / none."""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed in: float32, or float64 when the input already is float64."""
    return torch.promote_types(dtype, torch.float32)


def count_valid(mask: Tensor | None, like: Tensor) -> Tensor:
    """Number of valid positions (the denominator of ``"mean"``), at least 1 so that an
    all-masked batch gives a loss of 0 rather than NaN. ``mask``: ``[...]`` bool or None."""
    count = torch.tensor(like.numel(), device=like.device) if mask is None else mask.sum()
    return count.clamp_min(1).to(like.dtype)


def reduce_positions(
    per_position: Tensor,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Reduce a per-position loss.

    Args:
        per_position: ``[...]`` loss at each position.
        mask: ``[...]`` bool, True = valid; masked positions contribute exactly 0 (and get a
            zero gradient) even when their loss is inf or NaN.
        weights: ``[...]`` float per-position multipliers (e.g. router weights).
        reduction: ``"none"`` → ``weights·loss`` with zeros at masked positions; ``"sum"`` → its
            sum; ``"mean"`` → that sum divided by the number of valid positions (not by the sum
            of weights, so weights act as plain importance multipliers and an all-ones weight is
            a no-op).
    """
    check_reduction(reduction)
    loss = per_position if mask is None else torch.where(mask, per_position, 0.0)
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / count_valid(mask, loss)


def zero_masked_rows(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Replace the logits ``[..., V]`` of masked positions by zeros, so that garbage there (an
    all ``-inf`` padding row, say) cannot turn into NaN gradients; ``mask``: ``[...]`` bool."""
    return logits if mask is None else logits.masked_fill(~mask.unsqueeze(-1), 0.0)
