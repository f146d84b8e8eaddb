"""Divergences between a teacher distribution p and a student distribution q over a vocabulary.

All functions take log-probabilities (or logits) over the last dimension and are safe for
``-inf`` entries (masked vocabulary ids, possibly on both sides at the same id): ``0·log 0 = 0``
and no NaN appears in values or gradients. Identical inputs give exactly 0.

Kinds (p = teacher, q = student, both at the same temperature):

- ``fkl``  forward KL, KL(p ‖ q) (Hinton et al., 2015).
- ``rkl``  reverse KL, KL(q ‖ p) (Gu et al., 2024, "MiniLLM").
- ``jsd``  generalized Jensen-Shannon divergence with weight β, TRL's ``generalized_jsd_loss``
  convention (Agarwal et al., 2024, "On-Policy Distillation of Language Models: GKD"):
  m = β·p + (1−β)·q, JSD_β = β·KL(p ‖ m) + (1−β)·KL(q ‖ m). The endpoints are defined as
  β = 0 → KL(p ‖ q) (forward) and β = 1 → KL(q ‖ p) (reverse), exactly as in TRL; note that
  JSD_β itself tends to 0 at both ends, so the value jumps at β ∈ {0, 1}.
- ``skl``  skew KL (Ko et al., 2024, "DistiLLM"): KL(p ‖ α·p + (1−α)·q), α = ``skew``.
- ``srkl`` skew reverse KL (DistiLLM): KL(q ‖ (1−α)·p + α·q).
- ``tvd``  total variation distance, ½·Σ|p − q|.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reduction import check_reduction, compute_dtype, reduce_positions, zero_masked_rows

KINDS = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


def check_divergence_args(kind: str, *, temperature: float, beta: float, skew: float) -> None:
    """Raise ``ValueError`` on an unknown kind or an out-of-range hyper-parameter."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")


def kl_from_logprobs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p·(log p − log q) over the last dim; ``[..., V]`` → ``[...]``.

    Ids where p = 0 (``log_p = -inf``) contribute exactly 0 with a zero gradient, whatever
    ``log_q`` is there. NaN in ``log_p`` propagates (so NaN guards still see it).
    """
    log_ratio = torch.where(torch.isneginf(log_p), 0.0, log_p - log_q)
    return torch.einsum("...v,...v->...", log_p.exp(), log_ratio)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_b: float) -> Tensor:
    """log((1−w)·a + w·b) for distributions given as log-probs ``[..., V]``; ``w = weight_b``.

    Written as ``hi + log1p(w_lo·expm1(lo − hi))`` (hi/lo = the larger/smaller of the two
    log-probs at each id) so that it never overflows, equals ``log_a`` bit-for-bit when
    ``log_a == log_b`` (identical inputs → divergence exactly 0), and has finite gradients when
    either or both sides are ``-inf``.
    """
    if weight_b == 0.0:
        return log_a
    if weight_b == 1.0:
        return log_b
    a_is_hi = log_a >= log_b
    hi = torch.where(a_is_hi, log_a, log_b)
    lo = torch.where(a_is_hi, log_b, log_a)
    weight_lo = torch.full_like(hi, 1.0 - weight_b).masked_fill(a_is_hi, weight_b)
    gap = torch.where(torch.isneginf(hi), 0.0, lo - hi)
    return hi + torch.log1p(weight_lo * torch.expm1(gap))


def divergence_from_logprobs(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """Per-position divergence between normalized log-distributions.

    Args:
        student_logprobs: ``[..., V]`` log q (normalized over the last dim).
        teacher_logprobs: ``[..., V]`` log p.
        kind: one of :data:`KINDS` (see the module docstring for definitions).
        beta: JSD weight β ∈ [0, 1].
        skew: DistiLLM skew α ∈ [0, 1] for ``skl`` / ``srkl``.

    Returns:
        ``[...]`` divergence per position (no temperature scaling, no reduction).
    """
    log_q, log_p = student_logprobs, teacher_logprobs
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return kl_from_logprobs(log_p, log_q)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return kl_from_logprobs(log_q, log_p)
    if kind == "jsd":
        log_m = log_mixture(log_p, log_q, 1.0 - beta)
        return beta * kl_from_logprobs(log_p, log_m) + (1.0 - beta) * kl_from_logprobs(log_q, log_m)
    if kind == "skl":
        return kl_from_logprobs(log_p, log_mixture(log_p, log_q, 1.0 - skew))
    if kind == "srkl":
        return kl_from_logprobs(log_q, log_mixture(log_q, log_p, 1.0 - skew))
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")


def tempered_logprobs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / T)`` over the last dim, computed in float32 (float64 stays float64)."""
    return torch.log_softmax(logits.to(compute_dtype(logits.dtype)) / temperature, dim=-1)


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
    scale_by_t2: bool = False,
) -> Tensor:
    """Distillation divergence between full student and teacher logits.

    Both sides are divided by ``temperature`` and normalized with ``log_softmax`` in float32
    (fp16/bf16 inputs give a finite float32 result; float64 stays float64). Gradients flow to
    whichever inputs require them; pass a detached teacher.

    Args:
        student_logits: ``[..., V]``.
        teacher_logits: ``[..., V]`` (same shape).
        kind: ``fkl | rkl | jsd | skl | srkl | tvd`` (definitions in the module docstring).
        temperature: T > 0, divides both sides' logits.
        beta: JSD weight (β = 0 → forward KL, β = 1 → reverse KL).
        skew: DistiLLM skew α for ``skl`` / ``srkl``.
        mask: ``[...]`` bool, True = valid. Masked rows may hold anything (even all ``-inf``).
        weights: ``[...]`` float per-position multipliers.
        reduction: ``"mean"`` = Σ w·l over valid positions / number of valid positions (0 when
            nothing is valid); ``"sum"``; ``"none"`` = ``[...]`` w·l, zero at masked positions.
        scale_by_t2: multiply by T² (keeps gradient magnitudes comparable across temperatures).

    Returns:
        A scalar, or ``[...]`` for ``reduction="none"``.
    """
    check_divergence_args(kind, temperature=temperature, beta=beta, skew=skew)
    check_reduction(reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    per_position = divergence_from_logprobs(
        tempered_logprobs(zero_masked_rows(student_logits, mask), temperature),
        tempered_logprobs(zero_masked_rows(teacher_logits, mask), temperature),
        kind,
        beta=beta,
        skew=skew,
    )
    loss = reduce_positions(per_position, mask, weights, reduction)
    return loss * temperature**2 if scale_by_t2 else loss
