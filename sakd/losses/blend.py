"""The distillation objective α·[T²]·D + (1−α)·CE, on materialized logits.

:class:`~sakd.losses.spec.KDSpec` names what the KD term computes; :func:`kd_per_position` computes it for one
block of positions (used here and, chunk by chunk, by the fused loss); :func:`distill_loss`
blends it with cross-entropy and returns a :class:`DistillOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cross_entropy import cross_entropy_per_position
from .divergences import divergence_from_logprobs, tempered_logprobs
from .reduction import check_reduction, reduce_positions, zero_masked_rows
from .sparse import SPARSE_MODES, SparseTeacher, sparse_per_position
from .sparse_projection import one_to_one_as_many, stored_projected_kd
from .spec import KDSpec
from .vocab_map import check_vocab_map, project_many_to_one, project_to_shared_support, project_with_targets


def kd_per_position(
    student_logits: Tensor,
    teacher: Tensor | SparseTeacher,
    spec: KDSpec,
    *,
    vocab_map: Tensor | None = None,
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
    target_logprob: Tensor | None = None,
    teacher_to_student: Tensor | None = None,
) -> Tensor:
    """The KD divergence at each position, without reduction or T² scaling.

    Args:
        student_logits: ``[..., Vs]``.
        teacher: ``[..., Vt]`` dense teacher logits, or a stored :class:`SparseTeacher`
            (requires ``spec.sparse``; with a vocab map it is projected onto the student vocabulary by
            :func:`sakd.losses.sparse_projection.stored_projected_kd`).
        spec: what to compute.
        vocab_map: ``[Vs]`` student → teacher id or -1; without it ``Vs == Vt`` is required.
            Both distributions are projected onto the shared support first
            (:mod:`sakd.losses.vocab_map`); a sparse mode is then applied on that support.
        generator: random generator for on-the-fly ``sampled``.
        targets, target_logprob: ``[...]`` student target ids and the teacher's chain-rule
            log-probability of each target's text (NaN where unknown), at temperature
            ``spec.temperature``; see :func:`sakd.losses.vocab_map.project_with_targets`.
            Only with a vocab map.
        teacher_to_student: ``[Vt]`` many-to-one map (each teacher token to the student token its
            text begins with, or -1); replaces ``vocab_map`` for the projection
            (:func:`sakd.losses.vocab_map.project_many_to_one`).

    Returns:
        ``[...]`` per-position divergence (plus ``uld_weight`` × ULD with a vocab map).
    """
    if isinstance(teacher, SparseTeacher):
        if spec.sparse is None:
            raise ValueError(f"a SparseTeacher needs a sparse mode (one of {SPARSE_MODES})")
        if vocab_map is not None or teacher_to_student is not None:  # a cache serving another tokenizer
            if teacher_to_student is None:
                vt = max(int(vocab_map.max()), int(teacher.indices.max())) + 1
                teacher_to_student = one_to_one_as_many(vocab_map, vt)
            return stored_projected_kd(
                student_logits, teacher, spec, teacher_to_student, targets, target_logprob
            )
    if vocab_map is None and teacher_to_student is None:
        return _same_vocabulary_kd(student_logits, teacher, spec, generator)
    student_full = tempered_logprobs(student_logits, spec.temperature)
    teacher_full = tempered_logprobs(teacher, spec.temperature).to(student_full.dtype)
    if teacher_to_student is not None:
        student_lp, teacher_lp = project_many_to_one(
            student_full, teacher_full, teacher_to_student, targets, target_logprob
        )
    elif target_logprob is not None:
        if targets is None:
            raise ValueError("target_logprob needs targets")
        student_lp, teacher_lp = project_with_targets(
            student_full, teacher_full, vocab_map, targets, target_logprob
        )
    else:
        student_lp, teacher_lp = project_to_shared_support(student_full, teacher_full, vocab_map)
    if spec.sparse is not None:  # sparsify the projected distributions (log-probs are logits at T = 1)
        kd = sparse_per_position(
            student_lp,
            teacher_lp,
            spec.sparse,
            spec.kind,
            temperature=1.0,
            beta=spec.beta,
            skew=spec.skew,
            top_k=min(spec.top_k, student_lp.shape[-1]),
            num_samples=spec.num_samples,
            generator=generator,
        )
    else:
        kd = divergence_from_logprobs(student_lp, teacher_lp, spec.kind, beta=spec.beta, skew=spec.skew)
    if spec.uld_weight > 0:
        kd = kd + spec.uld_weight * _unmapped_uld(student_full, teacher_full, vocab_map, teacher_to_student)
    return kd


def _same_vocabulary_kd(
    student_logits: Tensor, teacher: Tensor | SparseTeacher, spec: KDSpec, generator: torch.Generator | None
) -> Tensor:
    """:func:`kd_per_position` when both sides share one vocabulary."""
    if spec.sparse is not None:
        return sparse_per_position(
            student_logits,
            teacher,
            spec.sparse,
            spec.kind,
            temperature=spec.temperature,
            beta=spec.beta,
            skew=spec.skew,
            top_k=spec.top_k,
            num_samples=spec.num_samples,
            generator=generator,
        )
    student_logprobs = tempered_logprobs(student_logits, spec.temperature)
    teacher_logprobs = tempered_logprobs(teacher, spec.temperature).to(student_logprobs.dtype)
    if student_logprobs.shape[-1] != teacher_logprobs.shape[-1]:
        raise ValueError(
            f"student vocab {student_logprobs.shape[-1]} != teacher vocab {teacher_logprobs.shape[-1]}; "
            "pass a vocab_map to distill across tokenizers"
        )
    return divergence_from_logprobs(
        student_logprobs, teacher_logprobs, spec.kind, beta=spec.beta, skew=spec.skew
    )


def _unmapped_uld(
    student_full: Tensor, teacher_full: Tensor, vocab_map: Tensor | None, teacher_to_student: Tensor | None
) -> Tensor:
    """The ULD distance between the two sides' probabilities on the ids the projection cannot match."""
    from .uld import uld_distance

    if teacher_to_student is not None:
        mapped_t = teacher_to_student >= 0
        mapped_s = torch.zeros(student_full.shape[-1], dtype=torch.bool, device=mapped_t.device)
        mapped_s[teacher_to_student[mapped_t]] = True
    else:
        mapped_s = vocab_map >= 0
        mapped_t = torch.zeros(teacher_full.shape[-1], dtype=torch.bool, device=vocab_map.device)
        mapped_t[vocab_map[mapped_s].long()] = True
    return uld_distance(
        student_full.reshape(-1, student_full.shape[-1]),
        teacher_full.reshape(-1, teacher_full.shape[-1]),
        student_mask=~mapped_s,
        teacher_mask=~mapped_t,
    ).reshape(student_full.shape[:-1])


@dataclass(frozen=True)
class DistillOutput:
    """Result of :func:`distill_loss` and :func:`sakd.losses.fused_linear_divergence`.

    Attributes:
        loss: the differentiable objective, ``alpha·kd + (1−alpha)·ce`` (``kd`` alone without
            labels).
        kd: detached KD term as it enters the blend: weighted, reduced, and multiplied by T²
            when ``scale_by_t2``.
        ce: detached cross-entropy term (same reduction), or None without labels.
        num_tokens: detached int64 number of valid positions (the ``"mean"`` denominator before
            clamping to 1); with ``reduction="sum"`` divide by a global count of these.
    """

    loss: Tensor
    kd: Tensor
    ce: Tensor | None
    num_tokens: Tensor

    def as_dict(self) -> dict[str, float]:
        """Plain floats for logging (synchronizes with the device)."""
        out = {"loss": self.loss.item(), "kd": self.kd.item(), "num_tokens": float(self.num_tokens.item())}
        if self.ce is not None:
            out["ce"] = self.ce.item()
        return out


def valid_positions(
    shape: torch.Size, device: torch.device, mask: Tensor | None, labels: Tensor | None, ignore_index: int
) -> Tensor:
    """``[...]`` bool: ``mask`` (all True if None) and, with labels, ``labels != ignore_index``.
    KD and CE are computed on the same positions so that one token count normalizes both."""
    valid = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask.bool()
    return valid if labels is None else valid & (labels != ignore_index)


def check_blend(alpha: float, labels: Tensor | None) -> None:
    """Raise ``ValueError`` on an alpha outside [0, 1] or a CE weight without labels."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if labels is None and alpha != 1.0:
        raise ValueError(f"alpha={alpha} gives cross-entropy a weight, but no labels were passed")


def distill_loss(
    student_logits: Tensor,
    teacher: Tensor | SparseTeacher,
    labels: Tensor | None = None,
    *,
    spec: KDSpec | None = None,
    alpha: float = 1.0,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    scale_by_t2: bool = True,
    reduction: str = "mean",
    vocab_map: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DistillOutput:
    """Blend KD and CE on materialized logits: ``alpha·[T²·]D + (1−alpha)·CE`` (Hinton et al., 2015).

    Args:
        student_logits: ``[..., Vs]``.
        teacher: ``[..., Vt]`` teacher logits or a :class:`SparseTeacher` (with ``spec.sparse``).
        labels: ``[...]`` int64 next-token targets aligned with the logits, or None (then
            ``alpha`` must be 1).
        spec: the KD term (default: forward KL at T = 1).
        alpha: KD weight in [0, 1].
        mask: ``[...]`` bool, True = valid; positions with ``labels == ignore_index`` are
            excluded from both terms too.
        weights: ``[...]`` float per-position multipliers, applied to both terms.
        reduction: ``"mean"`` (over valid positions), ``"sum"`` or ``"none"``.

    Returns:
        A :class:`DistillOutput`.
    """
    spec = spec or KDSpec()
    check_blend(alpha, labels)
    check_reduction(reduction)
    if vocab_map is not None and not isinstance(teacher, SparseTeacher):
        check_vocab_map(vocab_map, student_logits.shape[-1], teacher.shape[-1])
    valid = valid_positions(student_logits.shape[:-1], student_logits.device, mask, labels, ignore_index)
    student_logits = zero_masked_rows(student_logits, valid)
    if not isinstance(teacher, SparseTeacher):
        teacher = zero_masked_rows(teacher, valid)
    kd_scale = spec.temperature**2 if scale_by_t2 else 1.0
    per_kd = kd_per_position(student_logits, teacher, spec, vocab_map=vocab_map, generator=generator)
    kd = reduce_positions(per_kd, valid, weights, reduction) * kd_scale
    loss, ce = alpha * kd, None
    if labels is not None:
        per_ce = cross_entropy_per_position(
            student_logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing
        )
        ce = reduce_positions(per_ce, valid, weights, reduction)
        loss = loss + (1.0 - alpha) * ce
    return DistillOutput(
        loss=loss,
        kd=kd.detach(),
        ce=None if ce is None else ce.detach(),
        num_tokens=valid.sum(),
    )
