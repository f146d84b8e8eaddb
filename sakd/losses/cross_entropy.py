"""Next-token cross-entropy in float32, with label smoothing and per-token weights."""

from __future__ import annotations

import torch
from torch import Tensor

from .reduction import compute_dtype, reduce_positions


def cross_entropy_per_position(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0
) -> Tensor:
    """Per-position cross-entropy, the same formula as ``torch.nn.functional.cross_entropy``:
    ``(1−ε)·(−log q_y) + ε·(−mean_v log q_v)``.

    Args:
        logits: ``[..., V]`` (computed in float32 whatever their dtype).
        labels: ``[...]`` int64 target ids, already aligned with ``logits`` (shifted by the
            caller); ``ignore_index`` marks positions without a target.
        label_smoothing: ε ∈ [0, 1].

    Returns:
        ``[...]`` loss, exactly 0 at ignored positions.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    logprobs = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    loss = -logprobs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * logprobs.mean(-1)
    return torch.where(valid, loss, 0.0)


def cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    weights: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of ``logits [..., V]`` against ``labels [...]`` in float32.

    ``reduction="mean"`` divides Σ w·l by the number of non-ignored positions (as
    ``F.cross_entropy`` does without weights); ``"sum"`` and ``"none"`` as in
    :func:`sakd.losses.reduction.reduce_positions`. ``weights``: ``[...]`` per-position floats.
    """
    per_position = cross_entropy_per_position(
        logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    return reduce_positions(per_position, labels != ignore_index, weights, reduction)
