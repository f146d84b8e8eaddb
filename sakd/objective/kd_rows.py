"""The rows the KD term of one micro-batch is taken on (:class:`KDRows`), built from a stored teacher
distribution (:func:`stored_kd_rows`) or a live teacher's hidden states and head (:func:`live_kd_rows`);
:meth:`sakd.objective.composite.Objective.kd_rows` picks one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sakd.align.positions import gather_at_anchors, span_logprob
from sakd.config import LossConfig
from sakd.losses import Head, HeadInput, SparseTeacher, VocabBridge
from sakd.models.forward import HiddenAndHead
from sakd.objective.chain import inside_spans, teacher_token_logprobs
from sakd.teacher.signal import StoredSignal


@dataclass
class KDRows:
    """Where the KD term of one micro-batch is taken, one row per student position (``N = B·(Ls-1)``): the
    student's hidden states and head; the teacher's side at the same positions -- a live teacher's hidden
    states and head at its anchors across tokenizers (``[N, M, H]`` with ``mixture`` for M knowledge-augmentation
    samples), or a stored distribution's rows; the vocabulary bridge, the rows where KD applies (``kd_mask``,
    None = all), the student targets, and the teacher's chain-rule log-prob of each target's text (NaN where
    unknown; None without the chain rule)."""

    student: HeadInput
    teacher: HeadInput | SparseTeacher
    bridge: VocabBridge
    targets: torch.Tensor
    kd_mask: torch.Tensor | None
    anchor: torch.Tensor | None  # [B, Ls-1] teacher position per student position, or None
    target_logprob: torch.Tensor | None = None
    mixture: bool = False
    router: torch.Tensor | None = None  # [N, layers, experts] a stored signal's router probabilities


def student_rows(student: HiddenAndHead, vocab_size: int) -> HeadInput:
    """The student's hidden states at its predicting positions (``[:, :-1]``, flat) and its head."""
    hidden = student.hidden[:, :-1].reshape(-1, student.hidden.shape[-1])
    return HeadInput(hidden, Head(student.head_weight, student.head_bias, vocab_size))


def stored_kd_rows(
    student: HeadInput, stored: StoredSignal, bridge: VocabBridge, targets: torch.Tensor, chain: bool
) -> KDRows:
    """The stored distribution at each student position (already at its anchor)."""
    kd_mask = None if stored.kd_mask is None else stored.kd_mask[:, :-1].reshape(-1)
    router = stored.router
    return KDRows(
        student=student,
        teacher=stored.sparse.rows((slice(None), slice(None, -1))).reshape(-1),
        bridge=bridge,
        targets=targets,
        kd_mask=kd_mask,
        anchor=None,
        target_logprob=stored.target_logprob[:, :-1].reshape(-1)
        if chain and stored.target_logprob is not None
        else None,
        router=None if router is None else router[:, :-1].reshape(-1, *router.shape[2:]),
    )


def live_kd_rows(
    student: HeadInput,
    live: HiddenAndHead,
    bridge: VocabBridge,
    targets: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    cfg: LossConfig,
    chain: bool,
    temperature: float | None,
    head_vocab: int,
    teacher_vocab_size: int,
) -> KDRows:
    """A live teacher's hidden states at each student position's anchor (one-to-one without anchors) and its
    head cut to ``head_vocab``; with ``temperature`` and ``chain``, the teacher's log-prob of each multi-token
    target's text at it."""
    anchor = batch["anchor"][:, :-1] if "anchor" in batch else None
    samples = getattr(live, "samples", None)  # [M, B, Lt, H]: a mixture of M teachers (fkl only)
    mixture = samples is not None and cfg.kind == "fkl"
    states = (
        samples.permute(1, 2, 0, 3) if samples is not None and mixture else live.hidden
    )  # [B, Lt, (M,) H]
    if anchor is not None:
        t_hidden = gather_at_anchors(states, anchor)
    else:
        t_hidden = states[:, :-1]
    t_hidden = t_hidden.reshape(-1, *states.shape[2:])
    teacher_head = Head(live.head_weight, live.head_bias, head_vocab)
    target_logprob = None
    if anchor is not None and chain and temperature is not None:
        span_end = batch["span_end"][:, :-1]
        multi = (span_end > anchor + 1) & (anchor >= 0)
        teacher_ids = batch["teacher_input_ids"]
        needed = inside_spans(anchor, span_end, multi, teacher_ids.shape[1])
        tok_lp = teacher_token_logprobs(
            live, teacher_ids, temperature, needed, teacher_vocab_size, cfg.chunk_size
        )
        target_logprob = span_logprob(tok_lp, anchor, torch.where(multi, span_end, -1)).reshape(-1)
    return KDRows(
        student=student,
        teacher=HeadInput(t_hidden, teacher_head, mixture=mixture),
        bridge=bridge,
        targets=targets,
        kd_mask=None if anchor is None else (anchor >= 0).reshape(-1),
        anchor=anchor,
        target_logprob=target_logprob,
        mixture=mixture,
    )
