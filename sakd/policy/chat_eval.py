"""The teacher's loss on the student's own answers to held-out conversations (``data.format: chat``; the
chat form of :mod:`sakd.policy.continuations`, with the same ``cont_*`` keys).

Each held-out conversation is cut at its last user turn and rendered by the *student's* template with the
generation prompt (:mod:`sakd.policy.chat_answers`); the student answers it greedily and by sampling (seeded per
prompt: ``generation.temperature`` / ``top_p`` and the seed, as :func:`~sakd.policy.sampling.generate`),
until its end-of-turn token, EOS or ``max_new_tokens``. The teacher reads the prompt messages plus that
answer as the assistant message rendered by *its own* template, and its NLL (T = 1) is summed over its
tokens of the answer turn: those ending inside the answer's content, and the end-of-turn token when the
student emitted its own -- the targets of an offline assistant turn (:mod:`sakd.data.chat`).
``teacher_nll`` divides by the student's answer tokens (end-of-turn included), ``teacher_bpb`` by the UTF-8
bytes of the answer text (template text covers no bytes, as the chat ``bpb`` of :mod:`sakd.data.chat`);
``tokens`` is the mean answer length in student tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from sakd.evaluation.heldout import rank_batches
from sakd.policy.chat_answers import generation_prompt, prompt_messages, reading_side, spell_answer, stop_ids
from sakd.policy.engines import student_for_generation
from sakd.policy.sampling import generate, row_seed
from sakd.policy.scoring import MODES, ROLE_EVAL, ContinuationSpec, summarise, teacher_nll


def chat_spec(conversations: list[list[dict]], student_tokenizer: Any, **settings: Any) -> ContinuationSpec:
    """A :class:`ContinuationSpec` of held-out conversations: the student's prompts (module docstring);
    the prompt messages are kept alongside, as ``spec.prefixes``."""
    prefixes = [prompt_messages(m) for m in conversations]
    ids = [
        generation_prompt(student_tokenizer, p, f"held-out conversation {i}") for i, p in enumerate(prefixes)
    ]
    return ContinuationSpec(ids, prefixes=prefixes, **settings)


def answer_view(
    prefix: list[dict], completion: list[int], student_tok: Any, teacher_tok: Any, stops: list[int]
) -> tuple[list[int], int, int]:
    """(the teacher's ids up to its last scored token, its first scored token, the UTF-8 bytes of the answer
    the teacher scored: a trimming template's shows ``answer.strip()``)."""
    ended = bool(completion) and completion[-1] in stops
    answer, _ = spell_answer(completion[:-1] if ended else completion, student_tok)
    side = reading_side(teacher_tok, prefix, answer, ended, "a held-out answer (teacher template)")
    return side.ids, side.first, len(side.shown.encode("utf-8"))


@torch.no_grad()
def score_chat_answers(
    student: Any,
    teacher: Any,
    spec: ContinuationSpec,
    *,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    zero_stage: int = -1,
    accelerator: Any = None,
) -> dict[str, float]:
    """``cont_{greedy,sampled}_{teacher_nll,teacher_bpb,tokens}`` and ``cont_prompts`` of ``spec`` (from
    :func:`chat_spec`); ``student`` / ``teacher`` / ``accelerator`` as in
    :func:`sakd.policy.continuations.score_continuations`."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(teacher.parameters()).device
    stops = stop_ids(student_tokenizer)
    prefixes = spec.prefixes or []
    sums = torch.zeros((len(MODES), 3), dtype=torch.float64)  # nll, student tokens, bytes
    n = len(spec.prompts)
    for lo, counted in rank_batches(n, spec.batch_size, rank, world):
        rows = spec.prompts[lo : min(lo + spec.batch_size, n)]
        seeds = [row_seed(spec.seed, -1, lo + i, ROLE_EVAL) for i in range(len(rows))]
        with student_for_generation(student, zero_stage) as model:
            written = [
                generate(
                    model, rows, spec.sampling(m), seeds=seeds, tokenizer=student_tokenizer, stop_ids=stops
                )
                for m in MODES
            ]
        for k, completions in enumerate(written):
            views = [
                answer_view(prefixes[lo + i], c, student_tokenizer, teacher_tokenizer, stops)
                for i, c in enumerate(completions)
            ]
            nll = teacher_nll(teacher, views, len(teacher_tokenizer), device)
            if counted:
                sums[k] += torch.tensor([nll, sum(map(len, completions)), sum(v[2] for v in views)])
    return summarise(sums, n, accelerator, world)
