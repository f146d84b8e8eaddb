"""Generated sequences to a training micro-batch: the keys an off-policy batch has (``input_ids``,
``attention_mask``, ``labels``, ``sample_ids``; across tokenizers ``teacher_input_ids``,
``teacher_attention_mask``, ``anchor``, ``span_end``), so the objective runs on them unchanged.

**Prompt and completion masking.** ``labels`` is ``-100`` on the prompt and on the padding, so only the
positions that predict a generated token carry a loss (the objective sums over ``labels[:, 1:] != -100``).
On the student's own samples across tokenizers (``mask_unanchored``) a position whose token does not end on
a boundary the teacher shares has no teacher distribution; off-policy KD gives such a position CE on the
data, but CE on the student's *own* sample would only reinforce what it already wrote, so it carries no
loss at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sakd.policy.retokenize import Paired, pair_student_written, pair_teacher_written

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Row:
    """One generated sequence as the student reads it (``prompt_len`` of its tokens are prompt) and, across
    tokenizers, as the teacher reads it with the alignment."""

    student_ids: list[int]
    prompt_len: int
    paired: Paired | None = None


def student_written(
    prompts: list[list[int]], completions: list[list[int]], student_tok: Any, teacher_tok: Any | None
) -> list[Row]:
    """Rows of the student's own samples; ``teacher_tok`` (None: one vocabulary) re-reads their text."""
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = list(prompt) + list(completion)
        paired = None if teacher_tok is None else pair_student_written(ids, student_tok, teacher_tok)
        rows.append(Row(ids, len(prompt), paired))
    return rows


def teacher_written(
    prompts: list[list[int]], completions: list[list[int]], student_tok: Any, teacher_tok: Any | None
) -> list[Row]:
    """Rows of the teacher's samples (sequence-level KD); across tokenizers the student reads the text in
    its own tokens and every student token that ends inside the teacher's prompt is prompt."""
    rows = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = list(prompt) + list(completion)
        if teacher_tok is None:
            rows.append(Row(ids, len(prompt)))
            continue
        paired = pair_teacher_written(ids, student_tok, teacher_tok)
        prompt_chars = paired.teacher.spans[len(prompt) - 1][1] if prompt else 0
        prompt_len = sum(1 for _, end in paired.student.spans if end <= prompt_chars)
        rows.append(Row(paired.student.ids, prompt_len, paired))
    return rows


def collate(
    rows: list[Row],
    sample_ids: torch.Tensor,
    *,
    pad_id: int,
    teacher_pad_id: int = 0,
    mask_unanchored: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded ``[B, L]`` tensors of a micro-batch (see the module docstring for the masking)."""
    width = max(len(r.student_ids) for r in rows)
    n = len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        length = len(r.student_ids)
        ids[i, :length] = torch.as_tensor(r.student_ids, dtype=torch.long)
        mask[i, :length] = 1
        labels[i, r.prompt_len : length] = ids[i, r.prompt_len : length]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_ids": sample_ids.clone()}
    if rows[0].paired is None:
        return out
    t_width = max(len(r.paired.teacher.ids) for r in rows if r.paired is not None)
    t_ids = torch.full((n, t_width), teacher_pad_id, dtype=torch.long)
    t_mask = torch.zeros((n, t_width), dtype=torch.long)
    anchor = torch.full((n, width), -1, dtype=torch.long)
    span_end = torch.full((n, width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        assert r.paired is not None
        t = r.paired.teacher.ids
        t_ids[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        t_mask[i, : len(t)] = 1
        length = len(r.student_ids)
        anchor[i, :length] = r.paired.alignment.anchor
        span_end[i, :length] = r.paired.alignment.span_end
    if mask_unanchored:  # position s predicts token s + 1: no anchor at s, no loss on s + 1
        labels[:, 1:] = torch.where(anchor[:, :-1] >= 0, labels[:, 1:], IGNORE_INDEX)
    out.update(teacher_input_ids=t_ids, teacher_attention_mask=t_mask, anchor=anchor, span_end=span_end)
    return out
