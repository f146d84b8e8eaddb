"""Auxiliary distillation losses on hidden states and attention maps, and their projections.

- :func:`feature_loss` — MSE / cosine between student hidden states and projected teacher ones
  (FitNets-style hint loss; Romero et al., 2015).
- :func:`attention_transfer_loss` — MSE between attention maps after projecting the teacher's
  heads onto the student's heads (MiniLM-style; Wang et al., 2020).
- :func:`info_nce` — InfoNCE with in-batch negatives between pooled representations
  (Oord et al., 2018; contrastive representation distillation, Tian et al., 2020).
- :func:`masked_mean_pool`, :func:`layer_pairs` — helpers.
- the trainable projections belong to the terms that use them (``sakd.objective.terms``).

Reductions: the per-row losses (:func:`feature_loss`, :func:`attention_transfer_loss`) return a
**sum** over valid rows so that the caller can normalize by its own token count (the same
denominator as the logit loss); :func:`info_nce` returns a **mean** over the batch. All losses
are computed in float32 (float64 stays float64).

Gradient flow: teacher tensors never receive gradients. the terms detach the
teacher hidden states before projecting them, and :func:`attention_transfer_loss` detaches the
teacher attention maps, so gradients reach the student tensors and the projection weights only.

Feature and attention losses compare position t of the student with position t of the teacher,
so they require one-to-one aligned sequences (same tokenizer). The contrastive loss compares one
pooled vector per sequence and also works across tokenizers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reduction import compute_dtype

FEATURE_KINDS = ("mse", "cosine")


def _as_compute(x: Tensor) -> Tensor:
    return x.to(compute_dtype(x.dtype))


def _masked_sum(per_row: Tensor, mask: Tensor | None) -> Tensor:
    """Σ over rows where ``mask`` is True; masked rows give exactly 0 (and a zero gradient)."""
    if mask is not None:
        if mask.shape != per_row.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have shape {tuple(per_row.shape)}")
        per_row = torch.where(mask, per_row, 0.0)
    return per_row.sum()


def feature_loss(
    student_hidden: Tensor,
    projected_teacher: Tensor,
    kind: str = "mse",
    mask: Tensor | None = None,
) -> Tensor:
    """Hidden-state matching loss, summed over valid rows.

    Per row: ``mse`` = mean over the hidden dim of the squared error; ``cosine`` =
    1 − cos(student, teacher) ∈ [0, 2] (cos clamped to [−1, 1]; a zero vector has cos 0).
    Gradients flow to both inputs; the teacher side should come from
    ``FeatureTerm.project``, which detaches the teacher hidden states so that
    only the projection weights are trained on that side. Masked rows of both inputs are zeroed
    before use; if masked teacher rows may be non-finite, zero them *before* projecting too (as
    ``FeatureTerm.layer_losses`` does), or the projection's weight gradient is NaN.

    Args:
        student_hidden: ``[N, Hs]`` (any leading dims work, e.g. ``[B, L, Hs]``).
        projected_teacher: ``[N, Hs]`` teacher hidden states already projected to ``Hs``.
        kind: ``"mse"`` or ``"cosine"``.
        mask: ``[N]`` bool, True = valid row; None = all rows valid.

    Returns:
        Scalar: Σ over valid rows of the per-row loss (the caller divides by its token count).
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature loss kind {kind!r}; expected one of {FEATURE_KINDS}")
    if student_hidden.shape != projected_teacher.shape:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and projected teacher "
            f"{tuple(projected_teacher.shape)} must have the same shape"
        )
    student, teacher = _as_compute(student_hidden), _as_compute(projected_teacher)
    if mask is not None:  # zero masked rows first so that garbage there cannot reach the gradient
        if mask.shape != student.shape[:-1]:
            raise ValueError(f"mask {tuple(mask.shape)} must have shape {tuple(student.shape[:-1])}")
        student = torch.where(mask.unsqueeze(-1), student, 0.0)
        teacher = torch.where(mask.unsqueeze(-1), teacher, 0.0)
    if kind == "mse":
        per_row = (student - teacher).pow(2).mean(-1)
    else:
        cos = F.cosine_similarity(student, teacher, dim=-1, eps=1e-8).clamp(-1.0, 1.0)
        per_row = 1.0 - cos
    return _masked_sum(per_row, mask)


def project_heads(teacher_attn: Tensor, head_proj: nn.Linear) -> Tensor:
    """Mix teacher attention heads into student heads: ``[B, Ht, L, L]`` → ``[B, Hs, L, L]``.

    The linear map acts on the **head axis**: ``b h s t → b s t h``, apply ``head_proj``
    (``Ht → Hs``), permute back; i.e. ``out[b, j, s, t] = Σ_h W[j, h] · attn[b, h, s, t]``
    (+ bias[j] if any), in the projection's dtype, returned in the compute dtype; the result keeps the graph
    to ``head_proj``. ``head_proj`` is called as a module, not read as a weight: ZeRO-3 gathers a module's
    partitioned weight for its forward and again for its backward (a weight read directly is released
    after the forward and is empty in the backward).
    """
    if teacher_attn.dim() != 4 or teacher_attn.shape[1] != head_proj.in_features:
        raise ValueError(
            f"teacher attention must be [B, {head_proj.in_features}, L, L], got {tuple(teacher_attn.shape)}"
        )
    attn = teacher_attn.permute(0, 2, 3, 1).to(head_proj.weight.dtype)
    return _as_compute(head_proj(attn).permute(0, 3, 1, 2))


def attention_transfer_loss(
    student_attn: Tensor,
    teacher_attn: Tensor,
    head_proj: nn.Linear,
    mask: Tensor | None = None,
) -> Tensor:
    """MSE between student attention maps and head-projected teacher attention maps.

    The teacher maps are detached, then projected onto the student's heads with
    :func:`project_heads` (along the head axis). Per query row, the loss is the mean over
    heads × keys of the squared error; the result is the sum over valid query rows. Keys are
    not masked: all ``L`` keys enter the mean (padded keys carry zero attention on both sides
    when the models applied their padding mask, so they add 0 to the numerator).

    Requires one-to-one aligned sequences (same tokenizer, same length ``L``): query/key
    position t of the student is compared with position t of the teacher.

    Args:
        student_attn: ``[B, Hs, L, L]`` student attention probabilities.
        teacher_attn: ``[B, Ht, L, L]`` teacher attention probabilities.
        head_proj: ``nn.Linear(Ht, Hs)`` (``AttentionTerm.proj``).
        mask: ``[B, L]`` bool, True = valid query position; None = all valid.

    Returns:
        Scalar: Σ over valid ``(b, query)`` rows of mean over ``(head, key)`` of the squared error.
    """
    if student_attn.dim() != 4 or student_attn.shape[1] != head_proj.out_features:
        raise ValueError(
            f"student attention must be [B, {head_proj.out_features}, L, L], got {tuple(student_attn.shape)}"
        )
    if teacher_attn.shape[0] != student_attn.shape[0] or teacher_attn.shape[2:] != student_attn.shape[2:]:
        raise ValueError(
            f"student attention {tuple(student_attn.shape)} and teacher attention "
            f"{tuple(teacher_attn.shape)} must share batch and sequence sizes (aligned sequences)"
        )
    student, teacher = _as_compute(student_attn), _as_compute(teacher_attn.detach())
    if mask is not None:  # zero masked query rows first so that garbage there has no gradient
        if mask.shape != (student.shape[0], student.shape[2]):
            raise ValueError(
                f"mask {tuple(mask.shape)} must have shape {(student.shape[0], student.shape[2])}"
            )
        rows = mask[:, None, :, None]
        student = torch.where(rows, student, 0.0)
        teacher = torch.where(rows, teacher, 0.0)
    projected = project_heads(teacher, head_proj)
    if mask is not None:
        projected = torch.where(rows, projected, 0.0)
    per_row = (student - projected).pow(2).mean(dim=(1, 3))  # [B, L]
    return _masked_sum(per_row, mask)


def info_nce(student_pooled: Tensor, teacher_pooled: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE with in-batch negatives: row i of the student should pick row i of the teacher.

    Both sides are L2-normalized, ``logits = s @ t.T / temperature`` (``[B, B]``) and the loss
    is the cross-entropy with targets ``arange(B)``, **averaged over the batch** (the caller
    applies its own weight). One direction only (student → teacher). Gradients flow to both
    inputs (the teacher side is normally the output of a trainable projection of detached
    teacher states, see ``ContrastiveTerm.pair``).

    With ``B == 1`` there are no negatives and the loss is defined as 0 — returned as a scalar
    still attached to the graph (zero gradients, not None, so DDP sees the projections used).

    Args:
        student_pooled: ``[B, D]``.
        teacher_pooled: ``[B, D]``.
        temperature: τ > 0.

    Returns:
        Scalar mean cross-entropy.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_pooled.dim() != 2 or student_pooled.shape != teacher_pooled.shape:
        raise ValueError(
            f"student {tuple(student_pooled.shape)} and teacher {tuple(teacher_pooled.shape)} "
            "pooled tensors must both be [B, D]"
        )
    student = F.normalize(_as_compute(student_pooled), dim=-1)
    teacher = F.normalize(_as_compute(teacher_pooled), dim=-1)
    logits = student @ teacher.T / temperature
    batch = logits.shape[0]
    if batch < 2:
        return torch.where(torch.zeros((), dtype=torch.bool, device=logits.device), logits.sum(), 0.0)
    targets = torch.arange(batch, device=logits.device)
    return F.cross_entropy(logits, targets, reduction="mean")


def masked_mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` ``[B, L, H]`` over the positions where ``mask`` ``[B, L]`` is True.

    Masked positions contribute exactly 0 (even if they hold inf/NaN); a sequence with no valid
    position pools to zeros. Returns ``[B, H]`` in the compute dtype.
    """
    if mask.shape != hidden.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must have shape {tuple(hidden.shape[:-1])}")
    hidden = _as_compute(hidden)
    valid = mask.bool().unsqueeze(-1)
    total = torch.where(valid, hidden, 0.0).sum(1)
    return total / valid.sum(1).clamp_min(1).to(hidden.dtype)
