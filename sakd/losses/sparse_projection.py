"""A *stored* sparse teacher (:class:`SparseTeacher`: a few teacher ids per position, from an offline
cache) projected onto a student vocabulary of another tokenizer -- the sparse counterpart of
:func:`sakd.losses.vocab_map.project_many_to_one`, used when a cache made by one teacher serves students
with other tokenizers.

The online path projects the *full* teacher distribution: the teacher's probability of student token
``y`` is ``Σ_{v → y} p(v)`` over the teacher tokens whose text begins with ``y`` (``teacher_to_student``),
plus a shared tail bucket (the teacher's mass on unmapped ids against the student's mass on ids that
receive no teacher token), and a sparse mode is then applied to the projected pair. Here only the stored
ids are known, so:

- the student buckets of a position are the student ids its stored teacher ids map to (``S``), each with
  the summed stored probability;
- ``topk_tail``: one more bucket holds everything else -- the teacher's stored mass on unmapped ids plus
  its exact tail mass, against the student's mass outside ``S``; ``subset``: both sides restricted to the
  outcomes the stored ids reach and renormalized there -- the student ids of ``S`` and, when a stored id is
  unmapped, the rest outcome (text no teacher token begins with: the teacher's stored mass on unmapped ids
  against the student's mass on the ids that receive no teacher token, the online rest bucket; the student's
  mass on the other ids outside ``S`` is left out, as the teacher's unstored mass is); ``sampled``: the
  stored draws, counted per bucket (draws of unmapped ids count for the rest bucket, whose student mass is
  that on ids that receive no teacher token, as online);
- a target whose text the teacher spells with several tokens gets its chain-rule probability added to
  its bucket (or a bucket of its own), as online (not in ``sampled`` mode: the draws are fixed).

With every teacher id stored (k = V) ``S`` is the set of student ids that receive a teacher token and the
result equals the online projection (tested). With k < V the buckets are those of the top-k *teacher*
ids, where the online path takes the top-k of the *projected* buckets. ``sampled`` keeps its gradient
unbiased (each draw's bucket is a draw from the projected distribution); its value needs each drawn
bucket's probability, of which the stored probabilities of the ids drawn into it are a lower bound (their
sum alone put the value ~0.7 nats below the true KL on a many-to-one map): the teacher mass no draw hit,
known exactly, is shared equally among the undrawn ids (:func:`_projected_draws`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .divergences import divergence_from_logprobs, tempered_logprobs
from .sparse import (
    TAIL_FLOOR,
    SparseTeacher,
    check_stored_temperature,
    floored_tail,
    logsumexp_or_neginf,
    sampled_support_kl,
)
from .spec import KDSpec

NEG_INF = float("-inf")


def one_to_one_as_many(vocab_map: Tensor, teacher_vocab: int) -> Tensor:
    """A one-to-one ``vocab_map`` (``[Vs]`` teacher id per student id, or -1) as the ``[teacher_vocab]``
    many-to-one map it is a special case of (each mapped teacher id to its student id, others -1)."""
    t2s = torch.full((teacher_vocab,), -1, dtype=torch.long, device=vocab_map.device)
    mapped = (vocab_map >= 0).nonzero().squeeze(-1)
    t2s[vocab_map[mapped].long()] = mapped
    return t2s


def _student_ids_of(indices: Tensor, teacher_to_student: Tensor) -> Tensor:
    """The student id each stored teacher id maps to (-1: unmapped, or beyond the map)."""
    inside = indices < teacher_to_student.shape[0]
    return torch.where(inside, teacher_to_student[indices.clamp(max=teacher_to_student.shape[0] - 1)], -1)


def _with_targets(
    s_lp: Tensor, teacher: Tensor, in_s: Tensor, targets: Tensor, target_logprob: Tensor
) -> tuple[Tensor, Tensor]:
    """Add each row's chain-rule probability of its target ``y``: to ``y``'s bucket, or as a new bucket."""
    has = torch.isfinite(target_logprob)
    y = torch.where(has, targets, 0).clamp(0, s_lp.shape[-1] - 1).long().unsqueeze(-1)
    chain = torch.where(has, target_logprob, NEG_INF).to(teacher.dtype).unsqueeze(-1)
    current = teacher.gather(-1, y)
    teacher = teacher.scatter(-1, y, torch.where(has.unsqueeze(-1), torch.logaddexp(current, chain), current))
    in_s = in_s.scatter(-1, y, in_s.gather(-1, y) | has.unsqueeze(-1))
    return teacher, in_s


def project_stored_teacher(
    student_logprobs: Tensor,
    teacher: SparseTeacher,
    teacher_to_student: Tensor,
    *,
    tail: bool,
    targets: Tensor | None = None,
    target_logprob: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Student and teacher log-distributions over the student ids of ``S`` (see the module docstring).

    Args:
        student_logprobs: ``[N, Vs]`` normalized (tempered) student log-probs.
        teacher: ``[N, K]`` stored teacher ids and log-probs (same temperature); slots with count 0 are
            padding.
        teacher_to_student: ``[Vt]`` student id per teacher id, or -1.
        tail: the teacher's exact tail mass joins its rest bucket (``topk_tail``); without it the rest
            bucket holds only the stored mass on unmapped teacher ids (``subset``).
        targets, target_logprob: ``[N]`` chain-rule scores of each row's target (NaN: none).

    Returns:
        ``(student, teacher, in_s)``: ``[N, Vs + 1]`` log-probs (column ``Vs`` is the rest bucket, -inf
        when absent; ids outside ``S`` are -inf on both sides) and the ``[N, Vs]`` bool mask of ``S``.
    """
    n, vs = student_logprobs.shape
    ids = _student_ids_of(teacher.indices, teacher_to_student)
    live = torch.ones_like(ids, dtype=torch.bool) if teacher.counts is None else teacher.counts > 0
    mapped = live & (ids >= 0)
    t_lp = teacher.logprobs.to(student_logprobs.dtype)
    col = ids.clamp_min(0)
    mass = student_logprobs.new_zeros(n, vs).scatter_add_(-1, col, torch.where(mapped, t_lp.exp(), 0.0))
    hits = student_logprobs.new_zeros(n, vs).scatter_add_(-1, col, mapped.to(student_logprobs.dtype))
    in_s = hits > 0
    tiny = torch.finfo(mass.dtype).tiny
    t_buckets = torch.where(in_s, mass.clamp_min(tiny).log(), NEG_INF)
    if targets is not None and target_logprob is not None:
        t_buckets, in_s = _with_targets(student_logprobs, t_buckets, in_s, targets, target_logprob)
    s_buckets = torch.where(in_s, student_logprobs, NEG_INF)
    outside = ~in_s
    if not tail:  # subset: the rest is one outcome, as online -- text no teacher token begins with
        outside = outside & ~_receiving(teacher_to_student, vs)
    s_rest = logsumexp_or_neginf(torch.where(outside, student_logprobs, NEG_INF))
    rest = [torch.where(live & ~mapped, t_lp, NEG_INF)]  # stored mass on teacher ids no student id gets
    if tail:
        # the same floors as one tokenizer's topk_tail (sparse.floored_tail): a tail derived from rounded
        # values is never below TAIL_FLOOR (else it vanishes where the fp16 top-k mass rounds to 1, and the
        # rest bucket with it: topk_tail would silently become subset there); the rescaled top-k is
        # renormalized below
        t_tail = teacher.tail_logprob
        if teacher.indices.shape[-1] < teacher_to_student.shape[-1]:  # a tail with ids (as sparse.py)
            _, t_tail = floored_tail(torch.where(live, t_lp, NEG_INF), t_tail)
        elif t_tail is None:
            t_tail = torch.log1p(-torch.where(live, t_lp.exp(), 0.0).sum(-1).clamp(max=1.0))
        rest.append(t_tail.to(t_lp.dtype).unsqueeze(-1))
    t_rest = logsumexp_or_neginf(torch.cat(rest, -1))
    both = torch.isfinite(s_rest) & torch.isfinite(t_rest)  # as online: a one-sided rest is renormalized away
    s_rest, t_rest = torch.where(both, s_rest, NEG_INF), torch.where(both, t_rest, NEG_INF)
    student = torch.cat([s_buckets, s_rest.unsqueeze(-1)], -1)
    teacher_out = torch.cat([t_buckets, t_rest.unsqueeze(-1)], -1)
    return _normalize(student), _normalize(teacher_out), in_s


def _receiving(teacher_to_student: Tensor, student_vocab: int) -> Tensor:
    """``[Vs]`` bool: the student ids some teacher id maps to."""
    receives = torch.zeros(student_vocab, dtype=torch.bool, device=teacher_to_student.device)
    receives[teacher_to_student[teacher_to_student >= 0]] = True
    return receives


def _normalize(x: Tensor) -> Tensor:
    return x - logsumexp_or_neginf(x).unsqueeze(-1)


def _projected_draws(
    student_logprobs: Tensor, teacher: SparseTeacher, teacher_to_student: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The stored draws counted per student bucket: ``(c, log P̂, log Q)``, each ``[N, Vs + 1]`` (column
    ``Vs`` the rest bucket): the draw counts, the teacher's estimated bucket log-masses and the student's
    bucket log-probs, both normalized as the online projection normalizes them (module docstring).

    ``P̂_b = S_b + u_b·U/u``: ``S_b`` the stored mass of the ids drawn into ``b`` (a lower bound), plus the
    teacher mass of the ids no draw hit -- known exactly, ``U = 1 − Σ_drawn p_v`` -- shared equally among
    them (``u_b`` of the ``u`` undrawn ids map to ``b``). ``S_b ≤ P̂_b ≤ S_b + U``, ``Σ_b P̂_b = 1``, exact
    once the draws cover the teacher's mass, and deterministic given the draws (no log-of-noise bias)."""
    n, vs = student_logprobs.shape
    ids = _student_ids_of(teacher.indices, teacher_to_student)
    if teacher.counts is None:
        raise ValueError("sampled mode needs a SparseTeacher with counts (see sample_teacher)")
    counts = teacher.counts.to(student_logprobs.dtype)
    live = counts > 0
    receives = _receiving(teacher_to_student, vs)
    teacher_has_rest = bool((teacher_to_student < 0).any())
    student_has_rest = bool((~receives).any())
    q = student_logprobs
    if not teacher_has_rest and student_has_rest:  # online renormalizes the student on the receiving ids
        q = torch.where(receives, q, NEG_INF)
        q = q - logsumexp_or_neginf(q).unsqueeze(-1)
    q_rest = logsumexp_or_neginf(torch.where(receives, NEG_INF, student_logprobs))
    if not teacher_has_rest:
        q_rest = torch.full_like(q_rest, NEG_INF)
    col = torch.where(ids >= 0, ids, vs)
    p_drawn = torch.where(live, teacher.logprobs.to(counts.dtype).exp(), 0.0)
    size = torch.bincount(torch.where(teacher_to_student >= 0, teacher_to_student, vs), minlength=vs + 1)
    hits = counts.new_zeros(n, vs + 1).scatter_add_(-1, col, live.to(counts.dtype))
    undrawn = (size.to(counts.dtype) - hits).clamp_min(0.0)
    unseen = (1.0 - p_drawn.sum(-1, keepdim=True)).clamp_min(0.0) / undrawn.sum(-1, keepdim=True).clamp_min(
        1.0
    )
    mass = counts.new_zeros(n, vs + 1).scatter_add_(-1, col, p_drawn) + undrawn * unseen
    # draws of unmapped ids go to the rest bucket (column vs); without a student rest they are dropped and
    # (as online) the teacher is renormalized without its unmapped mass
    if not torch.isfinite(q_rest).any():
        mass = mass[:, :vs] / mass[:, :vs].sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        mass = torch.cat([mass, mass.new_zeros(n, 1)], -1)
    keep = live & ((ids >= 0) | torch.isfinite(q_rest).unsqueeze(-1))
    c = counts.new_zeros(n, vs + 1).scatter_add_(-1, col, torch.where(keep, counts, 0.0))
    log_p = torch.where(c > 0, mass.clamp_min(torch.finfo(mass.dtype).tiny).log(), NEG_INF)
    return c, log_p, torch.cat([q, q_rest.unsqueeze(-1)], -1)


def _sampled_projected_kl(
    student_logprobs: Tensor, teacher: SparseTeacher, teacher_to_student: Tensor
) -> Tensor:
    """Σ_b (c_b / n)·(log P̂_b − log Q_b) over the buckets of the stored draws (module docstring). The
    gradient (through log Q_b only) is the unbiased one whatever P̂_b is; P̂_b only sets the value."""
    c, log_p, log_q = _projected_draws(student_logprobs, teacher, teacher_to_student)
    log_ratio = torch.where(c > 0, log_p - log_q, 0.0)
    return (c * log_ratio).sum(-1) / c.sum(-1).clamp_min(1.0)


def sampled_projected_gap(
    student_logprobs: Tensor, teacher: SparseTeacher, teacher_to_student: Tensor
) -> Tensor:
    """The token router's never-negative gap from a sampled signal across tokenizers, the counterpart of
    :func:`sakd.losses.sparse.sampled_support_kl`: forward KL between teacher and student coarsened to the
    buckets drawn into plus one bucket with all other mass (the teacher's estimated as ``1 − Σ P̂_b``,
    floored at :data:`TAIL_FLOOR`, then renormalized). ``≥ 0`` always; with the drawn buckets' teacher mass
    estimated, it is near (not exactly) 0 when the student equals the projected teacher."""
    c, log_p, log_q = _projected_draws(student_logprobs, teacher, teacher_to_student)
    drawn = c > 0
    s_top = torch.where(drawn, log_q, NEG_INF)
    s_rest = logsumexp_or_neginf(torch.where(drawn, NEG_INF, log_q))
    t_rest = torch.log1p(-log_p.exp().sum(-1).clamp(max=1.0)).clamp_min(math.log(TAIL_FLOOR))
    t_rest = torch.where(torch.isfinite(s_rest), t_rest, NEG_INF)  # every bucket drawn: no rest
    teacher_b = _normalize(torch.cat([log_p, t_rest.unsqueeze(-1)], -1))
    return divergence_from_logprobs(torch.cat([s_top, s_rest.unsqueeze(-1)], -1), teacher_b, "fkl")


def stored_projected_kd(
    student_logits: Tensor,
    teacher: SparseTeacher,
    spec: KDSpec,
    teacher_to_student: Tensor,
    targets: Tensor | None = None,
    target_logprob: Tensor | None = None,
) -> Tensor:
    """Per-position KD between the student and a stored sparse teacher of another vocabulary.

    ``student_logits``: ``[..., Vs]``; ``teacher``: ``[..., K]`` at temperature ``spec.temperature``
    (``subset`` rescales another one); ``teacher_to_student``: ``[Vt]`` (use :func:`one_to_one_as_many`
    for a one-to-one map). Returns ``[...]`` (no reduction, no T² scaling).
    """
    if spec.sparse is None:
        raise ValueError("a stored SparseTeacher needs a sparse mode (subset, topk_tail or sampled)")
    if spec.uld_weight > 0:
        raise ValueError(
            "uld_weight needs the full teacher distribution; a stored SparseTeacher has a few ids"
        )
    check_stored_temperature(teacher, spec.sparse, spec.temperature)
    lead = student_logits.shape[:-1]
    student = tempered_logprobs(student_logits, spec.temperature).reshape(-1, student_logits.shape[-1])
    flat = teacher.reshape(-1)
    if spec.sparse == "sampled":
        return _sampled_projected_kl(student, flat, teacher_to_student).reshape(lead)
    if spec.sparse == "subset" and teacher.temperature != spec.temperature:  # z/T' rescaled to z/T (+ const)
        flat = SparseTeacher(flat.indices, flat.logprobs * (teacher.temperature / spec.temperature))
    s_b, t_b, _ = project_stored_teacher(
        student,
        flat,
        teacher_to_student,
        tail=spec.sparse == "topk_tail",
        targets=None if targets is None else targets.reshape(-1),
        target_logprob=None if target_logprob is None else target_logprob.reshape(-1),
    )
    kd = divergence_from_logprobs(s_b, t_b, spec.kind, beta=spec.beta, skew=spec.skew)
    return kd.reshape(lead)


def sampled_gap(
    student_logits: Tensor,
    teacher: SparseTeacher,
    temperature: float,
    teacher_to_student: Tensor | None = None,
) -> Tensor:
    """Per-position gap ``≥ 0`` from a stored ``sampled`` signal, for the token router (whose statistics are
    on a log scale, where the signed per-position value of ``sampled`` cannot go):
    :func:`sakd.losses.sparse.sampled_support_kl`, or across tokenizers :func:`sampled_projected_gap`.
    ``student_logits``: ``[..., Vs]``; ``teacher``: ``[..., K]`` at ``temperature``. Returns ``[...]``."""
    check_stored_temperature(teacher, "sampled", temperature)
    if teacher_to_student is None:
        return sampled_support_kl(student_logits.float(), teacher, temperature)
    lead = student_logits.shape[:-1]
    student = tempered_logprobs(student_logits.float(), temperature).reshape(-1, student_logits.shape[-1])
    return sampled_projected_gap(student, teacher.reshape(-1), teacher_to_student).reshape(lead)
