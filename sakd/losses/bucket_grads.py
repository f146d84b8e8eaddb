"""Closed-form gradients of a KD term between distributions over *buckets* of token ids.

A vocabulary projection (:mod:`sakd.losses.vocab_map`) and the ``subset`` / ``topk_tail`` sparse modes
(:mod:`sakd.losses.sparse`) all compare the teacher and the student on a coarser support: each bucket is
one student id (a mapped id, the chain-rule target's own bucket, a top-k id) or a set of ids (the tail),
and ids in no bucket are dropped (the student is renormalized over the rest). With ``u = z / T`` the
student's bucket logit is ``x_b = log Σ_{v∈b} exp(u_v)``, its bucket distribution is ``softmax(x)``, and
the KD term is the plain divergence between ``softmax(x)`` and the teacher's bucket distribution -- so its
gradient is the dense closed form (:func:`sakd.losses.logit_grads.kd_rows_and_grad_`, on ``x`` at T = 1)
followed by the chain rule through the logsumexp:

    ∂D/∂u_v = ∂D/∂x_{b(v)} · exp(u_v − x_{b(v)})   for v in bucket b(v), 0 for a dropped id,

which for a one-id bucket is just ``∂D/∂x_b``. Nothing here builds an autograd graph; the temporaries are
``[rows, buckets]`` and ``[rows, V]`` blocks.

Empty buckets (the own-target bucket of a row without one, a repeated id of the subset union, a tail
with no ids) hold :data:`FLOOR` instead of ``-inf``: ``exp`` of it is exactly 0 and the difference of two
floors is 0, so the dense closed forms stay finite and give the values of the reference, which handles
``-inf`` explicitly. The one difference: where forward KL has teacher mass on an empty student bucket
(or reverse KL the other way round) the reference is ``inf``; the rows are set to ``inf`` here too.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from .logit_grads import effective_kind, kd_rows_and_grad_, log_softmax_
from .spec import KDSpec, VocabBridge
from .vocab_map import many_to_one_buckets

FLOOR = -1e30
"""log 0 in the closed-form path: finite, so that ``FLOOR − FLOOR = 0`` and ``exp(FLOOR) = 0`` exactly."""

_T = TypeVar("_T")
_PER_TENSOR: dict[int, tuple[weakref.ref, dict[Any, Any]]] = {}


def per_tensor(tensor: Tensor, key: Any, build: Callable[[], _T]) -> _T:
    """``build()`` once per (tensor, key) while ``tensor`` lives: what a run derives from its vocabulary maps
    (checks, index tensors) is computed at its first micro-batch, not at every one (the maps are built once
    per run and never modified; the derivations need host synchronisations on a GPU)."""
    entry = _PER_TENSOR.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        for stale in [k for k, (ref, _) in _PER_TENSOR.items() if ref() is None]:
            del _PER_TENSOR[stale]
        entry = _PER_TENSOR[id(tensor)] = (weakref.ref(tensor), {})
    if key not in entry[1]:
        entry[1][key] = build()
    return entry[1][key]


def logsumexp_(x: Tensor) -> Tensor:
    """``[b, n]`` → ``[b]`` logsumexp over the last dim, computed in place in ``x`` (consumed);
    :data:`FLOOR` for an all ``-inf`` row."""
    top = x.amax(-1)
    empty = torch.isneginf(top)
    top = torch.where(empty, 0.0, top)
    out = x.sub_(top.unsqueeze(-1)).exp_().sum(-1).log_().add_(top)
    return torch.where(empty, FLOOR, out)


@dataclass(frozen=True)
class Buckets:
    """The student's buckets for a block of rows. Columns of the bucket logits, in order: the one-id
    buckets ``ids``, the own-target bucket (when ``own`` is given), the tail (when there is one).

    Attributes:
        ids: ``[M]`` student ids shared by every row, or ``[b, K]`` per row.
        own: ``[b]`` a student id with a bucket of its own in that row, or -1; None = no such column.
        tail_mask: ``[V]`` bool, the ids summed into the tail (before removing ``own``), or None.
        tail_rest: the tail is every id of the row outside ``ids`` and ``own`` (per-row ``ids``).
        repeated: ``[b, K]`` bool, one-id columns that repeat an id of the row (left empty).
    """

    ids: Tensor
    own: Tensor | None = None
    tail_mask: Tensor | None = None
    tail_rest: bool = False
    repeated: Tensor | None = None

    @property
    def has_tail(self) -> bool:
        return self.tail_mask is not None or self.tail_rest

    def special_columns(self, width: int) -> slice:
        """The columns that may be empty in some rows (own and tail)."""
        return slice(self.ids.shape[-1], width)

    def _set_own(self, x: Tensor, value: Tensor) -> None:
        """``x[r, own[r]] = value[r]`` in the rows with an own bucket (a scatter: no host sync)."""
        index = self.own.clamp_min(0).unsqueeze(-1)
        x.scatter_(
            -1, index, torch.where(self.own.unsqueeze(-1) >= 0, value.unsqueeze(-1), x.gather(-1, index))
        )

    def logits(self, u: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[b, B]`` bucket logits of ``u`` ``[b, V]`` (not modified) and the tail column (kept apart:
        the backward needs it after the bucket logits are overwritten)."""
        extra = int(self.own is not None) + int(self.has_tail)
        n = self.ids.shape[-1]
        if self.ids.dim() == 1:
            ids = torch.cat([self.ids, self.ids.new_zeros(extra)]) if extra else self.ids
            x = u.index_select(-1, ids)
        else:
            ids = torch.cat([self.ids, self.ids.new_zeros(u.shape[0], extra)], -1) if extra else self.ids
            x = u.gather(-1, ids)
        if self.repeated is not None:
            x[:, :n].masked_fill_(self.repeated, FLOOR)
        if self.own is not None:
            own = u.gather(-1, self.own.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            x[:, n] = torch.where(self.own >= 0, own, FLOOR)
        tail = None
        if self.has_tail:
            rest = u.masked_fill(~self.tail_mask, float("-inf")) if self.tail_mask is not None else u.clone()
            if self.tail_rest:
                rest.scatter_(-1, self.ids, float("-inf"))
            if self.own is not None:
                self._set_own(rest, torch.full_like(self.own, float("-inf"), dtype=rest.dtype))
            tail = logsumexp_(rest)
            x[:, -1] = tail
        return x, tail

    def backward_(self, grad: Tensor, u: Tensor, tail: Tensor | None) -> Tensor:
        """Overwrite ``u`` ``[b, V]`` with ∂D/∂u from ``grad`` = ∂D/∂(bucket logits) ``[b, B]``."""
        n = self.ids.shape[-1]
        if self.has_tail:
            # exp(u_v − x_tail): each tail id's share of the tail (0 for an empty tail)
            u.sub_(torch.where(tail == FLOOR, float("inf"), tail).unsqueeze(-1)).exp_().mul_(grad[:, -1:])
            if self.tail_mask is not None:
                u.masked_fill_(~self.tail_mask, 0.0)
            if self.tail_rest:
                u.scatter_(-1, self.ids, 0.0)
        else:
            u.zero_()
        if self.ids.dim() == 1:
            u.index_add_(-1, self.ids, grad[:, :n])
        else:
            u.scatter_add_(-1, self.ids, grad[:, :n])
        if self.own is not None:  # the own id is in no other bucket: its gradient is its column's
            self._set_own(u, grad[:, n])
        return u


@torch.no_grad()
def bucket_kd_(x: Tensor, teacher: Tensor, spec: KDSpec, special: slice | None) -> Tensor:
    """Divergence between ``softmax(x)`` and ``softmax(teacher)`` per row; overwrites ``x`` with its
    gradient (T = 1: ``x`` is already divided by the temperature) and consumes ``teacher``.

    ``special``: the columns where a bucket may be empty on one side only (see the module docstring)."""
    teacher.clamp_min_(FLOOR)  # -inf (a stored log 0) → FLOOR; NaN stays NaN
    kind = effective_kind(spec.kind, spec.beta, spec.skew)
    infinite = None
    if special is not None and kind in ("fkl", "rkl") and x[:, special].numel():
        s_empty, t_empty = x[:, special] <= FLOOR, teacher[:, special] <= FLOOR
        infinite = (s_empty & ~t_empty if kind == "fkl" else t_empty & ~s_empty).any(-1)
    rows = kd_rows_and_grad_(
        x, teacher, spec.kind, temperature=1.0, beta=spec.beta, skew=spec.skew, scratch=torch.empty_like(x)
    )
    return rows if infinite is None else torch.where(infinite, float("inf"), rows)


@dataclass(frozen=True)
class BridgeIndex:
    """The index tensors of a :class:`~sakd.losses.spec.VocabBridge`, built once per loss call.

    Buckets: one per student id that the teacher reaches (``student_ids``, in id order), an own-target
    bucket with chain-rule targets, and a shared tail when both sides have ids outside the buckets.
    ``teacher_ids``: ``[M]`` the teacher id of each bucket (one-to-one map), or None; ``teacher_bucket``:
    ``[Vt]`` the bucket of each teacher id for the many-to-one map (``M`` for none), or None.
    """

    student_ids: Tensor
    bucket_of: Tensor
    student_rest: Tensor
    teacher_rest: Tensor
    shared_tail: bool
    teacher_ids: Tensor | None = None
    teacher_bucket: Tensor | None = None

    @staticmethod
    def build(bridge: VocabBridge, student_vocab: int, teacher_vocab: int) -> BridgeIndex:
        if bridge.teacher_to_student is not None:
            t2s = bridge.teacher_to_student.long()
            mapped_t = t2s >= 0
            receives, student_ids, bucket_of = many_to_one_buckets(t2s, student_vocab)
            teacher_bucket = torch.where(mapped_t, bucket_of[t2s.clamp_min(0)], student_ids.numel())
            teacher_rest = (~mapped_t).nonzero().squeeze(-1)
            return BridgeIndex(
                student_ids, bucket_of, ~receives, teacher_rest,
                bool((~receives).any()) and teacher_rest.numel() > 0, teacher_bucket=teacher_bucket,
            )  # fmt: skip
        vocab_map = bridge.vocab_map.long()
        mapped = vocab_map >= 0
        student_ids = mapped.nonzero().squeeze(-1)
        teacher_ids = vocab_map[student_ids]
        teacher_free = torch.ones(teacher_vocab, dtype=torch.bool, device=vocab_map.device)
        teacher_free[teacher_ids] = False
        teacher_rest = teacher_free.nonzero().squeeze(-1)
        bucket_of = torch.where(mapped, mapped.long().cumsum(0) - 1, -1)
        return BridgeIndex(
            student_ids, bucket_of, ~mapped, teacher_rest,
            bool((~mapped).any()) and teacher_rest.numel() > 0, teacher_ids=teacher_ids,
        )  # fmt: skip

    @staticmethod
    def cached(bridge: VocabBridge, student_vocab: int, teacher_vocab: int) -> BridgeIndex:
        """:meth:`build`, once per map tensor (:func:`per_tensor`)."""
        key_tensor = bridge.teacher_to_student if bridge.teacher_to_student is not None else bridge.vocab_map
        return per_tensor(
            key_tensor,
            ("bridge", bridge.teacher_to_student is not None, student_vocab, teacher_vocab),
            lambda: BridgeIndex.build(bridge, student_vocab, teacher_vocab),
        )

    @property
    def size(self) -> int:
        return self.student_ids.numel()


@torch.no_grad()
def bridge_buckets(
    u: Tensor,
    teacher: Tensor,
    index: BridgeIndex,
    targets: Tensor | None,
    chain: Tensor | None,
    scratch: Tensor,
) -> tuple[Buckets, Tensor, Tensor, Tensor | None]:
    """The student's buckets and bucket logits and the teacher's bucket log-probs of a block.

    Args:
        u: ``[b, Vs]`` student logits divided by T (not modified).
        teacher: ``[b, Vt]`` teacher logits divided by T (consumed).
        index: the bridge's index tensors.
        targets, chain: ``[b]`` student target ids and the teacher's chain-rule log-probability of each
            target's text (NaN = none), or None (:func:`sakd.losses.vocab_map.project_with_targets`).
        scratch: a ``[b, Vt]`` buffer.

    Returns:
        ``(buckets, x, teacher_buckets, x_tail)``: ``x`` and ``teacher_buckets`` are ``[b, B]``.
    """
    m = index.size
    own = None
    if chain is not None:
        has = torch.isfinite(chain)
        y = torch.where(has, targets, 0).clamp(0, u.shape[-1] - 1).long()
        bucket = index.bucket_of[y]
        own = torch.where(has & (bucket < 0), y, -1)
    buckets = Buckets(index.student_ids, own, index.student_rest if index.shared_tail else None)
    x, x_tail = buckets.logits(u)
    width = x.shape[-1]
    if chain is not None or index.teacher_bucket is not None:
        log_softmax_(teacher, 1.0, scratch)  # the chain rule and the sums need normalized log-probs
    tail = logsumexp_(teacher.index_select(-1, index.teacher_rest)) if index.shared_tail else None
    if index.teacher_ids is not None:
        pad = index.teacher_ids.new_zeros(width - m)
        t = teacher.index_select(-1, torch.cat([index.teacher_ids, pad]))
    else:  # many-to-one: the sum of the probabilities of the teacher tokens of each bucket
        sums = teacher.new_zeros(teacher.shape[0], width + 1)
        sums.index_add_(
            -1, torch.where(index.teacher_bucket < m, index.teacher_bucket, width), teacher.exp_()
        )
        t = sums[:, :width]
        t[:, :m].clamp_min_(torch.finfo(t.dtype).tiny).log_()
    if chain is not None:  # a mapped target: the multi-token path adds to its bucket (no host sync)
        chain = chain.to(t.dtype)
        col = bucket.clamp_min(0).unsqueeze(-1)
        current = t.gather(-1, col).squeeze(-1)
        both = torch.logaddexp(current, torch.where(has, chain, float("-inf")))
        t.scatter_(-1, col, torch.where(has & (bucket >= 0), both, current).unsqueeze(-1))
        t[:, m] = torch.where(own >= 0, chain, FLOOR)
    if tail is not None:
        t[:, -1] = tail
    return buckets, x, t, x_tail
