"""Distillation from a sparse teacher signal: a few token ids per position instead of V logits.

Three modes, each usable with dense teacher logits (sparsified on the fly) or with a stored
:class:`SparseTeacher` (an offline cache):

- ``subset``: the earlier system's method. Both distributions are restricted to a subset of ids
  and renormalized there; with dense teacher logits the subset is the union of the teacher's
  and the student's top-k, with a stored teacher it is the stored ids (the teacher's
  probability at the student's extra ids is not in the cache). Cheap but biased (Anshumann et
  al., 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs").
- ``topk_tail``: the teacher's top-k probabilities plus one bucket with the remaining teacher
  mass; the student is coarsened the same way (its probabilities at those ids plus all of its
  other mass), so any divergence kind is computed between proper (k+1)-bucket distributions.
- ``sampled``: unbiased random-sampling KD (Anshumann et al., 2025). n ids are drawn from the
  teacher at temperature T and kept with their counts c_i; the per-position estimate is
  ``Σ_i (c_i/n)·(log p_i − log q_i)``, whose expectation is exactly KL(p ‖ q) (forward KL).
  The ``−Σ (c_i/n)·log q_i`` part is the paper's unbiased cross-entropy estimate; adding the
  stored ``log p_i`` turns it into a KL estimate (same gradient, 0 when student = teacher).
  Only ``kind="fkl"`` is defined for this mode.

With k = V, ``subset`` and ``topk_tail`` equal the dense divergence, and ``sampled`` does in
expectation (the tests check all three).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .divergences import check_divergence_args, divergence_from_logprobs, tempered_logprobs
from .reduction import check_reduction, compute_dtype, reduce_positions, zero_masked_rows

SPARSE_MODES = ("subset", "topk_tail", "sampled")

TAIL_FLOOR = 1e-6
"""The least teacher tail mass ``topk_tail`` compares against when the tail is *derived* from stored top-k
values (``1 − Σ exp(stored log-probs)``, no stored tail). Such a tail is only known to the rounding of the
stored values: fp16 log-probs carry a relative error of about 2⁻¹¹ each, so on a peaked teacher the
derived tail is noise of order 1e-4 and is 0 (log −inf) wherever the rounded top-k mass reaches 1 -- and
reverse / symmetric divergences are then +inf for any student with mass outside the top-k. A floor of 1e-6
lies below what fp16 values resolve, and bounds the reverse-KL tail term ``q·log(q/1e-6)`` by about 13.8
per position (the cost of one confident wrong token), not +inf. An exact tail (computed from the full
distribution: online, or stored by a ``topk_tail`` cache) is kept as it is, down to
:data:`EXACT_TAIL_FLOOR`, which only replaces a tail that underflowed to 0."""

EXACT_TAIL_FLOOR = torch.finfo(torch.float32).tiny


def floored_tail(top: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
    """The teacher's top-k log-probs ``[..., K]`` and tail log-mass ``[...]`` with the tail at least
    :data:`TAIL_FLOOR` when derived from ``top`` (``tail`` None), at least :data:`EXACT_TAIL_FLOOR` when
    given; where a floor applies the top-k is rescaled so that the K + 1 buckets sum to 1. Elsewhere both
    are returned unchanged (computed in ``top``'s dtype)."""
    floor = TAIL_FLOOR if tail is None else EXACT_TAIL_FLOOR
    if tail is None:
        tail = torch.log1p(-top.exp().sum(-1).clamp(max=1.0))
    tail = tail.to(top.dtype)
    low = ~(tail >= math.log(floor))  # NaN-free inputs: tail < log floor, including -inf
    rescale = math.log1p(-floor) - torch.logsumexp(top, dim=-1)
    top = torch.where(low.unsqueeze(-1), top + rescale.unsqueeze(-1), top)
    return top, torch.where(low, math.log(floor), tail)


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher distribution kept at K token ids per position (what an offline cache stores).

    Attributes:
        indices: ``[..., K]`` int64 token ids, distinct within a position.
        logprobs: ``[..., K]`` ``log_softmax(z / temperature)`` of the full teacher logits z at
            ``indices``. A cache holding raw values z and ``lse = logsumexp(z / T)`` gets these
            as ``z / T − lse``.
        temperature: the temperature ``logprobs`` (and samples) were computed at.
        counts: ``[..., K]`` integer sample counts (``sampled`` mode); slots with count 0 are
            padding. None for top-k signals.
        tail_logprob: ``[...]`` log of the teacher mass outside ``indices`` (``topk_tail``).
            If None it is derived as ``log(1 − Σ exp(logprobs))``, which loses precision when
            the tail is below ~1e-7.
    """

    indices: Tensor
    logprobs: Tensor
    temperature: float = 1.0
    counts: Tensor | None = None
    tail_logprob: Tensor | None = None

    def rows(self, index: Tensor | slice | tuple[slice, ...]) -> SparseTeacher:
        """The same signal for a subset of positions (indexes the leading dims)."""
        return SparseTeacher(
            indices=self.indices[index],
            logprobs=self.logprobs[index],
            temperature=self.temperature,
            counts=None if self.counts is None else self.counts[index],
            tail_logprob=None if self.tail_logprob is None else self.tail_logprob[index],
        )

    def reshape(self, *leading: int) -> SparseTeacher:
        """Reshape the leading (position) dims, e.g. ``reshape(-1)`` to flatten ``[B, L]``."""
        k = self.indices.shape[-1]
        return SparseTeacher(
            indices=self.indices.reshape(*leading, k),
            logprobs=self.logprobs.reshape(*leading, k),
            temperature=self.temperature,
            counts=None if self.counts is None else self.counts.reshape(*leading, k),
            tail_logprob=None if self.tail_logprob is None else self.tail_logprob.reshape(*leading),
        )


def check_stored_temperature(teacher: SparseTeacher, mode: str, temperature: float) -> None:
    """A stored ``topk_tail`` / ``sampled`` signal is only exact at its own temperature (a stored ``subset``
    is rescaled to any); one check for every path that reads a stored signal."""
    if mode != "subset" and teacher.temperature != temperature:
        raise ValueError(
            f"a stored {mode} teacher signal is only exact at its own temperature "
            f"({teacher.temperature}); got temperature={temperature}"
        )


def logsumexp_or_neginf(x: Tensor) -> Tensor:
    """``logsumexp`` over the last dim that returns ``-inf`` for an all ``-inf`` row with a
    zero (not NaN) gradient."""
    empty = torch.isneginf(x).all(-1, keepdim=True)
    out = torch.logsumexp(torch.where(empty, 0.0, x), dim=-1, keepdim=True)
    return torch.where(empty, float("-inf"), out).squeeze(-1)


@torch.no_grad()
def topk_teacher(teacher_logits: Tensor, k: int, *, temperature: float = 1.0) -> SparseTeacher:
    """Keep the teacher's top-k log-probs at ``temperature`` plus the exact tail log-mass.

    ``teacher_logits``: ``[..., V]`` → a :class:`SparseTeacher` with ``[..., min(k, V)]`` fields.
    """
    logprobs = tempered_logprobs(teacher_logits, temperature)
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    tail = logsumexp_or_neginf(logprobs.scatter(-1, indices, float("-inf")))
    return SparseTeacher(indices, values, temperature, tail_logprob=tail)


@torch.no_grad()
def sample_teacher(
    teacher_logits: Tensor,
    num_samples: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SparseTeacher:
    """Draw ``num_samples`` ids per position from ``softmax(teacher_logits / T)`` (with
    replacement) and keep each distinct id once with its count (Anshumann et al., 2025).

    ``teacher_logits``: ``[..., V]`` (every row a valid distribution) → fields ``[..., n]``,
    sorted by id; repeated draws leave padding slots with count 0.
    """
    logprobs = tempered_logprobs(teacher_logits, temperature)
    flat = logprobs.reshape(-1, logprobs.shape[-1])
    ids = torch.multinomial(flat.exp(), num_samples, replacement=True, generator=generator)
    ids = ids.sort(dim=-1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run = first.cumsum(-1) - 1
    run_counts = torch.zeros_like(ids).scatter_add_(1, run, torch.ones_like(ids))
    counts = torch.where(first, run_counts.gather(1, run), 0)
    shape = (*logprobs.shape[:-1], num_samples)
    return SparseTeacher(
        indices=ids.reshape(shape),
        logprobs=flat.gather(1, ids).reshape(shape),
        temperature=temperature,
        counts=counts.reshape(shape),
    )


def _subset_logprobs(
    student_logits: Tensor, teacher: Tensor | SparseTeacher, k: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs renormalized on the subset, ``[..., S]`` each."""
    if isinstance(teacher, SparseTeacher):
        ids = teacher.indices
        # log_softmax(z/T) at T' rescaled to T is z/T + const; the constant cancels below.
        teacher_sub = teacher.logprobs * (teacher.temperature / temperature)
        student_sub = student_logits.gather(-1, ids) / temperature
    else:
        k = min(k, student_logits.shape[-1])
        ids = torch.cat(
            [teacher.topk(k, dim=-1).indices, student_logits.detach().topk(k, dim=-1).indices], -1
        )
        ids = ids.sort(dim=-1).values
        repeated = torch.zeros_like(ids, dtype=torch.bool)
        repeated[..., 1:] = ids[..., 1:] == ids[..., :-1]
        teacher_sub = teacher.to(student_logits.dtype).gather(-1, ids).masked_fill(repeated, float("-inf"))
        student_sub = student_logits.gather(-1, ids).masked_fill(repeated, float("-inf"))
        teacher_sub, student_sub = teacher_sub / temperature, student_sub / temperature
    return torch.log_softmax(student_sub, dim=-1), torch.log_softmax(teacher_sub, dim=-1)


def _tail_logprobs(
    student_logits: Tensor, teacher: SparseTeacher, temperature: float
) -> tuple[Tensor, Tensor]:
    """Student and teacher (k+1)-bucket log-distributions: the k ids, then the tail."""
    student_logprobs = tempered_logprobs(student_logits, temperature)
    student_top = student_logprobs.gather(-1, teacher.indices)
    student_tail = logsumexp_or_neginf(student_logprobs.scatter(-1, teacher.indices, float("-inf")))
    teacher_top = teacher.logprobs.to(student_logprobs.dtype)
    teacher_tail = teacher.tail_logprob
    if teacher.indices.shape[-1] < student_logprobs.shape[-1]:  # a tail with ids: never below the floor
        teacher_top, teacher_tail = floored_tail(teacher_top, teacher_tail)
    elif teacher_tail is None:  # k = V: the tail holds no id (its derived mass is rounding)
        teacher_tail = torch.full_like(student_tail, float("-inf"))
    student_buckets = torch.cat([student_top, student_tail.unsqueeze(-1)], -1)
    teacher_buckets = torch.cat([teacher_top, teacher_tail.to(teacher_top.dtype).unsqueeze(-1)], -1)
    return student_buckets, teacher_buckets


def _sampled_kl(student_logits: Tensor, teacher: SparseTeacher, temperature: float) -> Tensor:
    """Unbiased per-position estimate of KL(p ‖ q) from sampled ids and counts."""
    if teacher.counts is None:
        raise ValueError("sampled mode needs a SparseTeacher with counts (see sample_teacher)")
    student_logprobs = tempered_logprobs(student_logits, temperature).gather(-1, teacher.indices)
    counts = teacher.counts.to(student_logprobs.dtype)
    drawn = counts > 0
    log_ratio = torch.where(drawn, teacher.logprobs.to(counts.dtype) - student_logprobs, 0.0)
    return (counts * log_ratio).sum(-1) / counts.sum(-1).clamp_min(1.0)


def sampled_support_kl(student_logits: Tensor, teacher: SparseTeacher, temperature: float) -> Tensor:
    """A per-position *gap* from a sampled signal that is never negative (for the token router): forward
    KL between teacher and student both coarsened to the drawn ids plus one bucket with all other mass.

    The per-position value of ``sampled`` (:func:`_sampled_kl`) is unbiased but a single position's
    estimate is below 0 at a real share of positions (a student close to the teacher), which a
    log-scale statistic cannot take. Here both sides are exact at the drawn ids (the stored teacher
    log-probs, the student's full distribution) and the rest bucket holds ``1 − Σ`` of each, so this is
    the KL of a coarsening of p and q: ``0 ≤ gap ≤ KL(p ‖ q)`` (data processing), 0 when the student
    equals the teacher, and it tends to KL(p ‖ q) as the draws cover the teacher. The teacher's rest is
    derived from the stored values, so it is floored like ``topk_tail``'s (:func:`floored_tail`); a
    position whose draws cover every id has no rest on either side. No gradient is meant to flow."""
    if teacher.counts is None:
        raise ValueError("a sampled gap needs a SparseTeacher with counts (see sample_teacher)")
    logprobs = tempered_logprobs(student_logits, temperature)
    drawn = teacher.counts > 0
    s_top = torch.where(drawn, logprobs.gather(-1, teacher.indices), float("-inf"))
    s_rest = logsumexp_or_neginf(logprobs.scatter(-1, teacher.indices, float("-inf")))
    t_top, t_rest = floored_tail(torch.where(drawn, teacher.logprobs.to(logprobs.dtype), float("-inf")), None)
    t_rest = torch.where(torch.isfinite(s_rest), t_rest, float("-inf"))  # every id drawn: no rest
    t_buckets = torch.cat([t_top, t_rest.unsqueeze(-1)], -1)
    t_buckets = t_buckets - logsumexp_or_neginf(t_buckets).unsqueeze(-1)
    return divergence_from_logprobs(torch.cat([s_top, s_rest.unsqueeze(-1)], -1), t_buckets, "fkl")


def sparse_per_position(
    student_logits: Tensor,
    teacher: Tensor | SparseTeacher,
    mode: str,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    top_k: int = 64,
    num_samples: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-position sparse-teacher divergence (no reduction, no T² scaling).

    Args:
        student_logits: ``[..., V]`` full student logits (computed in float32).
        teacher: dense ``[..., V]`` teacher logits, or a stored :class:`SparseTeacher` with
            ``[..., K]`` fields.
        mode: ``subset | topk_tail | sampled`` (see the module docstring).
        kind: divergence kind on the sparse distributions; ``sampled`` supports only ``fkl``.
        top_k: k for on-the-fly ``subset`` / ``topk_tail`` (ignored for a stored teacher).
        num_samples: n for on-the-fly ``sampled``.
        generator: random generator for on-the-fly ``sampled``.

    Returns:
        ``[...]`` divergence per position.
    """
    if mode not in SPARSE_MODES:
        raise ValueError(f"unknown sparse mode {mode!r}; expected one of {SPARSE_MODES}")
    if mode == "sampled" and kind != "fkl":
        raise ValueError(f"sampled KD estimates forward KL only; got kind={kind!r}")
    if isinstance(teacher, SparseTeacher):
        check_stored_temperature(teacher, mode, temperature)
    student_logits = student_logits.to(compute_dtype(student_logits.dtype))
    if mode == "sampled":
        if not isinstance(teacher, SparseTeacher):
            teacher = sample_teacher(teacher, num_samples, temperature=temperature, generator=generator)
        return _sampled_kl(student_logits, teacher, temperature)
    if mode == "subset":
        student_logprobs, teacher_logprobs = _subset_logprobs(student_logits, teacher, top_k, temperature)
    else:
        if not isinstance(teacher, SparseTeacher):
            teacher = topk_teacher(teacher, top_k, temperature=temperature)
        student_logprobs, teacher_logprobs = _tail_logprobs(student_logits, teacher, temperature)
    return divergence_from_logprobs(student_logprobs, teacher_logprobs, kind, beta=beta, skew=skew)


def sparse_divergence(
    student_logits: Tensor,
    teacher: Tensor | SparseTeacher,
    mode: str,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
    top_k: int = 64,
    num_samples: int = 64,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
    scale_by_t2: bool = False,
) -> Tensor:
    """:func:`sparse_per_position` reduced like :func:`sakd.losses.divergence` (same ``mask``,
    ``weights``, ``reduction`` and ``scale_by_t2`` semantics)."""
    check_divergence_args(kind, temperature=temperature, beta=beta, skew=skew)
    check_reduction(reduction)
    if not isinstance(teacher, SparseTeacher):
        teacher = zero_masked_rows(teacher, mask)
    per_position = sparse_per_position(
        zero_masked_rows(student_logits, mask),
        teacher,
        mode,
        kind,
        temperature=temperature,
        beta=beta,
        skew=skew,
        top_k=top_k,
        num_samples=num_samples,
        generator=generator,
    )
    loss = reduce_positions(per_position, mask, weights, reduction)
    return loss * temperature**2 if scale_by_t2 else loss
