"""The seam for teachers and students with different vocabularies.

A *vocab map* is an int64 tensor ``[Vs]``: entry v is the teacher id whose token is the same
string as student token v, or -1 when the teacher has no such token. Building a good map (by
token string, with normalization of byte-level/sentencepiece markers) is the job of
``sakd.align``; this module only consumes one.

Given a map, both distributions are moved onto a shared support: the M mapped student ids, and
one tail bucket when *both* vocabularies have unmapped ids — the teacher's tail holds its mass
on teacher ids that no student token maps to, the student's its mass on unmapped student ids.
When only one side has unmapped ids (e.g. a student vocabulary that is a subset of the
teacher's), that side cannot be matched by the other at all, so it is renormalized over the
mapped ids instead (a tail with mass on one side only would make forward or reverse KL
infinite). Any divergence kind is then computed between these two proper distributions. With an
identity map nothing changes and the result equals the plain divergence.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sparse import logsumexp_or_neginf


def check_vocab_map(vocab_map: Tensor, student_vocab: int, teacher_vocab: int) -> None:
    """Raise ``ValueError`` unless ``vocab_map`` is an int tensor ``[student_vocab]`` of teacher
    ids in ``[0, teacher_vocab)`` or -1, with no teacher id used twice."""
    if vocab_map.dtype not in (torch.int32, torch.int64) or vocab_map.shape != (student_vocab,):
        raise ValueError(
            f"vocab_map must be an int tensor of shape ({student_vocab},), got "
            f"{vocab_map.dtype} {tuple(vocab_map.shape)}"
        )
    mapped = vocab_map[vocab_map >= 0]
    if (vocab_map < -1).any() or (mapped >= teacher_vocab).any():
        raise ValueError(f"vocab_map entries must be -1 or teacher ids in [0, {teacher_vocab})")
    if mapped.unique().numel() != mapped.numel():
        raise ValueError("vocab_map maps two student tokens to the same teacher token")


def project_to_shared_support(
    student_logprobs: Tensor, teacher_logprobs: Tensor, vocab_map: Tensor
) -> tuple[Tensor, Tensor]:
    """Project both log-distributions onto the mapped ids (plus a shared tail bucket).

    Args:
        student_logprobs: ``[..., Vs]`` normalized log-probs.
        teacher_logprobs: ``[..., Vt]`` normalized log-probs.
        vocab_map: ``[Vs]`` teacher id per student id, or -1 (see :func:`check_vocab_map`).

    Returns:
        ``(student, teacher)`` log-probs over the same ``M`` or ``M + 1`` buckets.
    """
    student_ids = (vocab_map >= 0).nonzero().squeeze(-1)
    teacher_ids = vocab_map[student_ids].long()
    student = student_logprobs.index_select(-1, student_ids)
    teacher = teacher_logprobs.index_select(-1, teacher_ids)
    student_has_rest = student_ids.numel() < student_logprobs.shape[-1]
    teacher_has_rest = teacher_ids.numel() < teacher_logprobs.shape[-1]
    if not (student_has_rest and teacher_has_rest):
        if student_has_rest:
            student = student - torch.logsumexp(student, dim=-1, keepdim=True)
        if teacher_has_rest:
            teacher = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
        return student, teacher
    unmapped_student = torch.ones(student_logprobs.shape[-1], dtype=torch.bool, device=vocab_map.device)
    unmapped_student[student_ids] = False
    unmapped_teacher = torch.ones(teacher_logprobs.shape[-1], dtype=torch.bool, device=vocab_map.device)
    unmapped_teacher[teacher_ids] = False
    student_tail = logsumexp_or_neginf(student_logprobs.masked_fill(~unmapped_student, float("-inf")))
    teacher_tail = logsumexp_or_neginf(teacher_logprobs.masked_fill(~unmapped_teacher, float("-inf")))
    return (
        torch.cat([student, student_tail.unsqueeze(-1)], -1),
        torch.cat([teacher, teacher_tail.unsqueeze(-1)], -1),
    )


def support_index(vocab_map: Tensor) -> Tensor:
    """``[Vs]`` int64: the bucket of each mapped student id in :func:`project_to_shared_support`'s
    output (mapped ids keep their order), -1 for unmapped ids."""
    mapped = vocab_map >= 0
    return torch.where(mapped, mapped.long().cumsum(0) - 1, -1)


def _normalize(x: Tensor) -> Tensor:
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def project_with_targets(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    vocab_map: Tensor,
    targets: Tensor,
    target_logprob: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`project_to_shared_support`, with the teacher's probability of each row's target
    student token supplied from elsewhere (the chain rule over the teacher tokens that spell it).

    Rows with a finite ``target_logprob`` are adjusted: when the target ``y`` is mapped, its
    teacher bucket becomes ``p(map(y)) + p_chain(y)`` (two tokenizations of the same text);
    when it is unmapped, ``y`` gets a bucket of its own on both sides (student: ``q(y)``, taken
    out of the student's tail; teacher: ``p_chain(y)``). The teacher side is then
    renormalized. If no row has a finite ``target_logprob`` the result is exactly
    :func:`project_to_shared_support`'s.

    Args:
        student_logprobs: ``[N, Vs]``; teacher_logprobs: ``[N, Vt]`` (normalized log-probs).
        vocab_map: ``[Vs]`` teacher id per student id, or -1.
        targets: ``[N]`` student target ids (any value where ``target_logprob`` is NaN).
        target_logprob: ``[N]`` teacher log-probability of the target's text, or NaN.

    Returns:
        ``(student, teacher)`` log-probs over the same ``M + 1`` (no shared tail) or ``M + 2``
        buckets: the mapped ids, the own-target bucket, and the shared tail.
    """
    has = torch.isfinite(target_logprob)
    if not bool(has.any()):
        return project_to_shared_support(student_logprobs, teacher_logprobs, vocab_map)
    student_ids = (vocab_map >= 0).nonzero().squeeze(-1)
    teacher_ids = vocab_map[student_ids].long()
    vs, vt = student_logprobs.shape[-1], teacher_logprobs.shape[-1]
    student = student_logprobs.index_select(-1, student_ids)
    teacher = teacher_logprobs.index_select(-1, teacher_ids)
    y = torch.where(has, targets, 0).clamp(0, vs - 1).long()
    bucket = support_index(vocab_map)[y]
    mapped_y, own_y = has & (bucket >= 0), has & (bucket < 0)
    chain = torch.where(has, target_logprob, float("-inf")).to(teacher.dtype)
    # a mapped target: add the multi-token path to the single-token path of the same text
    col = bucket.clamp_min(0).unsqueeze(-1)
    current = teacher.gather(-1, col).squeeze(-1)
    teacher = teacher.scatter(
        -1, col, torch.where(mapped_y, torch.logaddexp(current, chain), current).unsqueeze(-1)
    )
    # an unmapped target: a bucket of its own on both sides
    neg_inf = torch.full_like(chain, float("-inf"))
    s_y = torch.where(own_y, student_logprobs.gather(-1, y.unsqueeze(-1)).squeeze(-1), neg_inf)
    student = torch.cat([student, s_y.unsqueeze(-1)], -1)
    teacher = torch.cat([teacher, torch.where(own_y, chain, neg_inf).unsqueeze(-1)], -1)
    if student_ids.numel() < vs and teacher_ids.numel() < vt:  # a shared tail, without q(y)
        unmapped_s = torch.ones(vs, dtype=torch.bool, device=vocab_map.device)
        unmapped_s[student_ids] = False
        rest_s = unmapped_s.unsqueeze(0) & (
            torch.arange(vs, device=y.device).unsqueeze(0) != torch.where(own_y, y, -1).unsqueeze(-1)
        )
        unmapped_t = torch.ones(vt, dtype=torch.bool, device=vocab_map.device)
        unmapped_t[teacher_ids] = False
        s_tail = logsumexp_or_neginf(student_logprobs.masked_fill(~rest_s, float("-inf")))
        t_tail = logsumexp_or_neginf(teacher_logprobs.masked_fill(~unmapped_t, float("-inf")))
        student = torch.cat([student, s_tail.unsqueeze(-1)], -1)
        teacher = torch.cat([teacher, t_tail.unsqueeze(-1)], -1)
    return _normalize(student), _normalize(teacher)


def many_to_one_buckets(teacher_to_student: Tensor, student_vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """The buckets of a many-to-one map: one per student id that some teacher id maps to, in id order.

    Returns ``(receives [Vs] bool, student_ids [M] int64, bucket_of [Vs] int64: the bucket or -1)``.
    """
    t2s = teacher_to_student.long()
    receives = torch.zeros(student_vocab, dtype=torch.bool, device=t2s.device)
    receives[t2s[t2s >= 0]] = True
    student_ids = receives.nonzero().squeeze(-1)
    bucket_of = torch.full((student_vocab,), -1, dtype=torch.long, device=t2s.device)
    bucket_of[student_ids] = torch.arange(student_ids.numel(), device=t2s.device)
    return receives, student_ids, bucket_of


def project_many_to_one(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    teacher_to_student: Tensor,
    targets: Tensor | None = None,
    target_logprob: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Project the teacher onto the student vocabulary through a many-to-one map.

    ``teacher_to_student[v]`` is the student token that teacher token ``v``'s text *begins with*
    (its longest student-token prefix; :func:`sakd.align.vocab.first_piece_map`), or -1. The teacher's
    probability of student token ``y`` is then ``Σ_{v → y} p(v)``: the probability that the text
    continues with ``y`` as the student would cut it, which a one-to-one map gets wrong whenever
    the teacher's next token is longer than the student's (it would drop ``p("Ġlives")`` and keep only
    ``p("Ġli")``, a token the teacher rarely predicts because it would not cut there).

    The support is the student ids that receive some teacher token, plus one shared tail (the
    student's mass on the other ids, the teacher's on unmapped ids) when both sides have one; when
    only one side does, that side is renormalized over the support. ``targets`` /
    ``target_logprob`` add a chain-rule probability for each row's target as in
    :func:`project_with_targets` (NaN = none).

    Returns:
        ``(student, teacher)`` normalized log-probs over the same buckets.
    """
    vs, vt = student_logprobs.shape[-1], teacher_logprobs.shape[-1]
    mapped_t = teacher_to_student >= 0
    receives, student_ids, bucket_of = many_to_one_buckets(teacher_to_student, vs)
    m = student_ids.numel()
    lead = teacher_logprobs.shape[:-1]
    t_flat = teacher_logprobs.reshape(-1, vt)
    probs = t_flat[:, mapped_t].exp()
    teacher = t_flat.new_zeros(t_flat.shape[0], m).index_add_(
        1, bucket_of[teacher_to_student[mapped_t]], probs
    )
    teacher = teacher.clamp_min(torch.finfo(teacher.dtype).tiny).log().reshape(*lead, m)
    teacher = torch.where(teacher <= torch.finfo(teacher.dtype).min / 2, float("-inf"), teacher)
    student = student_logprobs.index_select(-1, student_ids)
    s_rest_mask = ~receives
    own = None
    if target_logprob is not None and targets is not None and bool(torch.isfinite(target_logprob).any()):
        has = torch.isfinite(target_logprob)
        y = torch.where(has, targets, 0).clamp(0, vs - 1).long()
        b = bucket_of[y]
        chain = torch.where(has, target_logprob, float("-inf")).to(teacher.dtype)
        col = b.clamp_min(0).unsqueeze(-1)
        cur = teacher.gather(-1, col).squeeze(-1)
        teacher = teacher.scatter(
            -1, col, torch.where(has & (b >= 0), torch.logaddexp(cur, chain), cur).unsqueeze(-1)
        )
        own_y = has & (b < 0)
        neg = torch.full_like(chain, float("-inf"))
        s_y = torch.where(own_y, student_logprobs.gather(-1, y.unsqueeze(-1)).squeeze(-1), neg)
        own = (own_y, y, s_y, torch.where(own_y, chain, neg))
        student = torch.cat([student, s_y.unsqueeze(-1)], -1)
        teacher = torch.cat([teacher, own[3].unsqueeze(-1)], -1)
    if bool(s_rest_mask.any()) and bool((~mapped_t).any()):
        rest = s_rest_mask.expand_as(student_logprobs)
        if own is not None:
            ar = torch.arange(vs, device=student_logprobs.device)
            rest = rest & (ar != torch.where(own[0], own[1], -1).unsqueeze(-1))
        s_tail = logsumexp_or_neginf(student_logprobs.masked_fill(~rest, float("-inf")))
        t_tail = logsumexp_or_neginf(teacher_logprobs.masked_fill(mapped_t, float("-inf")))
        student = torch.cat([student, s_tail.unsqueeze(-1)], -1)
        teacher = torch.cat([teacher, t_tail.unsqueeze(-1)], -1)
    return _normalize(student), _normalize(teacher)
