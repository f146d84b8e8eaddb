"""Position alignment between two tokenizations of the same text, by character spans.

Student position ``s`` predicts the student token that starts where token ``s`` ends; teacher
position ``t`` predicts the teacher token that starts where token ``t`` ends. When both tokens
end at the same character (a *shared boundary*) the two models have read the same text and are
predicting the continuation of the same prefix, so their next-token distributions can be
compared (after mapping vocabularies). Those pairs are the *anchors*.

For anchor ``(s, t)`` the student's next token ``s + 1`` covers characters ``[c, c2)``. When
``c2`` is also a shared boundary, reached by teacher token ``e``, the teacher tokens
``t + 1 .. e`` spell exactly the student's next token: one-to-one when ``e == t + 1``,
otherwise a multi-token span whose probability the teacher gives by the chain rule
(:func:`span_logprob`).

Only the *last* token ending at a character counts as ending there: byte-level tokenizers split a
multi-byte character into several tokens that all report the character's span, and only after
the last of them is the prefix a whole string.

Everything here works on end offsets, which are robust to tokenizers that trim leading spaces
from their offset spans (``Ġthe`` reported as ``(1, 4)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

Span = tuple[int, int]


@dataclass(frozen=True)
class PositionAlignment:
    """Anchors of one student sequence against one teacher sequence.

    Attributes:
        anchor: ``[Ls]`` int64; teacher position ending on the same character as student
            position ``s`` (a shared boundary), or -1.
        span_end: ``[Ls]`` int64; for an anchored ``s`` whose next student token ends on a
            shared boundary too, the teacher position ``e`` ending there (the teacher tokens
            ``anchor[s] + 1 .. e`` spell student token ``s + 1``), else -1.
    """

    anchor: Tensor
    span_end: Tensor

    @property
    def coverage(self) -> float:
        """Share of student tokens that end on a shared boundary."""
        return float((self.anchor >= 0).float().mean()) if self.anchor.numel() else 0.0


def align_ends(
    student_ends: Sequence[int] | np.ndarray, teacher_ends: Sequence[int] | np.ndarray
) -> PositionAlignment:
    """:func:`align_spans` from the tokens' character *end* offsets alone (vectorised with numpy: the
    packing of a large corpus aligns every block with it).

    Ends are first made non-decreasing (zero-width or trimmed spans never move a boundary back).
    """
    s = np.maximum.accumulate(np.asarray(student_ends, dtype=np.int64).reshape(-1))
    t = np.maximum.accumulate(np.asarray(teacher_ends, dtype=np.int64).reshape(-1))
    n = s.shape[0]
    anchor = np.full(n, -1, dtype=np.int64)
    if n and t.size:
        # only the last token ending at a character ends there (byte pieces of one character)
        last = np.ones(n, dtype=bool)
        last[:-1] = s[:-1] != s[1:]
        j = np.searchsorted(t, s, side="right") - 1  # the last teacher token ending at or before s
        hit = (j >= 0) & (t[np.maximum(j, 0)] == s)
        anchor = np.where(last & hit & (s > 0), j, -1)
    span_end = np.full(n, -1, dtype=np.int64)
    if n > 1:
        cur, nxt = anchor[:-1], anchor[1:]
        span_end[:-1] = np.where((cur >= 0) & (nxt > cur), nxt, -1)
    return PositionAlignment(torch.from_numpy(anchor), torch.from_numpy(span_end))


def align_spans(student_spans: Sequence[Span], teacher_spans: Sequence[Span]) -> PositionAlignment:
    """Align two tokenizations of one text by their character spans.

    Args:
        student_spans: ``(start, end)`` character offsets of each student token, in order.
        teacher_spans: the same for the teacher tokens of the same text.

    Returns:
        :class:`PositionAlignment` for the student positions.
    """
    return align_ends([int(b) for _, b in student_spans], [int(b) for _, b in teacher_spans])


def identity_alignment(length: int) -> PositionAlignment:
    """The alignment of a tokenization with itself: every position anchors to itself."""
    ar = torch.arange(length)
    return PositionAlignment(ar, torch.where(ar < length - 1, ar + 1, -1))


def gather_at_anchors(teacher_states: Tensor, anchor: Tensor) -> Tensor:
    """The teacher's per-position tensors at each student position's anchor.

    Args:
        teacher_states: ``[B, Lt, *feature]`` (hidden states of a layer, final hidden states, ...).
        anchor: ``[B, Ls]`` teacher position per student position, or -1 (no anchor).

    Returns:
        ``[B, Ls, *feature]``; rows without an anchor hold teacher position 0 -- callers mask them
        out with ``anchor >= 0``.
    """
    index = anchor.clamp_min(0)
    index = index.reshape(*index.shape, *([1] * (teacher_states.dim() - 2))).expand(
        *index.shape, *teacher_states.shape[2:]
    )
    return teacher_states.gather(1, index)


def span_logprob(token_logprobs: Tensor, anchor: Tensor, span_end: Tensor) -> Tensor:
    """The teacher's log-probability of each student next token, by the chain rule.

    Args:
        token_logprobs: ``[B, Lt]``; entry ``j`` is the teacher's log-probability, at position
            ``j``, of its own next token ``j + 1`` (the last entry is unused). ``[M, B, Lt]`` for an
            equal mixture of M teachers (Knowledge Augmentation): each spells the whole span, so the
            result is ``log mean_m exp(Σ_j token_logprobs[m, j])``.
        anchor: ``[B, Ls]`` teacher position per student position, or -1.
        span_end: ``[B, Ls]`` the teacher position where the student's next token ends, or -1.

    Returns:
        ``[B, Ls]``: ``Σ_{j = anchor}^{span_end − 1} token_logprobs[j]`` — the probability of
        the teacher tokens that spell the student's next token — where ``span_end >= 0``, and
        NaN elsewhere.
    """
    lp = token_logprobs.double()  # prefix sums of a few hundred log-probs: keep the difference exact
    if lp.dim() == 3:  # a mixture: each member's span log-prob, then log of their mean
        spans = torch.stack([span_logprob(m, anchor, span_end) for m in lp])
        mixed = torch.logsumexp(spans, 0) - math.log(lp.shape[0])  # NaN rows stay NaN
        return mixed.to(token_logprobs.dtype)
    prefix = torch.cat(
        [lp.new_zeros(lp.shape[0], 1), lp.cumsum(-1)], dim=-1
    )  # prefix[j] = sum of entries < j
    ok = span_end >= 0
    hi = prefix.gather(1, span_end.clamp_min(0))
    lo = prefix.gather(1, anchor.clamp_min(0))
    return torch.where(ok, hi - lo, torch.full_like(hi, float("nan"))).to(token_logprobs.dtype)


def alignment_coverage(blocks: Any) -> dict[str, float]:
    """Coverage figures of packed, aligned blocks (a dataset with ``anchor`` / ``span_end``).

    ``anchored``: share of student tokens that end on a shared boundary; ``one_to_one`` and
    ``multi_token``: shares of student next tokens the teacher spells with one / several tokens.
    """
    anchored = one = multi = total = 0
    for anchor, span_end in zip(blocks[:]["anchor"], blocks[:]["span_end"], strict=True):
        a, e = torch.as_tensor(anchor), torch.as_tensor(span_end)
        total += a.numel()
        anchored += int((a >= 0).sum())
        ok = e >= 0
        one += int((ok & (e == a + 1)).sum())
        multi += int((ok & (e > a + 1)).sum())
    total = max(total, 1)
    return {"anchored": anchored / total, "one_to_one": one / total, "multi_token": multi / total}
