"""On-policy and sequence-level distillation over conversations (``data.format: chat``; GKD's main use).

**The prompt** of a conversation is its messages up to and including the last user turn (without a user
turn: up to the last assistant turn), rendered by the *writer's* chat template with the generation prompt
(``add_generation_prompt=True``): the student's for ``on`` / ``mixed``, the teacher's for ``sequence``.
The writer continues it until its template's end-of-turn token (ChatML's ``<|im_end|>``), its EOS, or
``generation.max_new_tokens``. The training conversations are the prompts, under a batch plan of their
own (as a prompt file's; advanced by the optimizer step), so a ``mixed`` run's off-policy steps read the
packed blocks -- the dataset's own assistant turns -- and its on-policy steps the student's answers.

**The answer** is the text of the written tokens (a special token other than the final end-of-turn / EOS
spells its literal string); the end-of-turn token closes it when the writer emitted one (``ended``). The
writer's row keeps its tokens as written; the reader reads the answer as its own template shows it -- a
template that trims message contents (Llama 3's, Gemma's) shows ``answer.strip()`` -- and the alignment
counts the answer's characters as written, so a sampled answer with outer whitespace stays aligned.

**Who reads what.**

=============  ================================================================================================
policy         rows
=============  ================================================================================================
on / mixed     the student's prompt and its own answer tokens, kept as written. Loss on the answer tokens and
               the end-of-turn token if the student emitted it (the offline rule of :mod:`sakd.data.chat`:
               the end-of-turn token is a target). One vocabulary and one template: the teacher reads the same
               ids. Otherwise the teacher reads *its own* rendering of the prompt messages plus the answer as
               the assistant message's content, aligned on the content characters
               (:mod:`sakd.data.chat_pair`): only positions whose token and next token end inside the answer
               carry KD, so across renderings the end-of-turn token and the answer's first token (predicted by
               template text) carry no loss -- on the student's own sample a position without a teacher
               distribution gets none (:mod:`sakd.policy.batches`).
sequence       the teacher's answer becomes the student's training data: the student reads its own template's
               rendering of the prompt messages plus that answer, and its targets are the answer turn's tokens
               (content, and end-of-turn if the teacher emitted it). ``sequence_loss: kd`` lets the teacher
               score them on its own written tokens, aligned the same way.
=============  ================================================================================================
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sakd.align.positions import PositionAlignment, align_ends
from sakd.data import BatchPlan, split_documents
from sakd.data.chat import Rendered, apply_template, ends_inside, render, require_template
from sakd.data.chat_pair import anchorable, content_coordinates
from sakd.data.tokenize import monotone_ends
from sakd.errors import DataError
from sakd.policy.batches import Row
from sakd.policy.retokenize import Paired, SpelledIds, _table

log = logging.getLogger(__name__)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to and including its last user turn (no user turn: up to its last assistant)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if users:
        return msgs[: users[-1] + 1]
    return msgs[: max(i for i, m in enumerate(msgs) if m["role"] == "assistant")]


def stop_ids(tokenizer: Any) -> list[int]:
    """EOS and the template's end-of-turn token (the text between an assistant content and its turn's end,
    when that is one token of ``tokenizer``)."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    r = render(tokenizer, probe, "the chat template")
    tail = r.text[r.assistant_contents[-1][1] : r.turns[-1][1]]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    eos = tokenizer.eos_token_id
    return [i for i in ({eos} | ({int(ids[0])} if len(ids) == 1 else set())) if i is not None]


def generation_prompt(tokenizer: Any, prefix: list[dict], where: str) -> list[int]:
    """``prefix`` rendered by ``tokenizer``'s template with its generation prompt, in its tokens."""
    text = apply_template(tokenizer, prefix, True, where)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def spell_answer(ids: list[int], tokenizer: Any) -> tuple[str, np.ndarray]:
    """The text of written tokens and each token's character end in it (a special token spells its literal
    string; a token holding part of a multi-byte character ends where that character ends)."""
    table = _table(tokenizer)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []
    ends, n = [], 0
    for token_id in ids:
        data = table.data[token_id] if 0 <= token_id < len(table.data) else None
        if data is None:  # a special token: its literal text
            tail = decoder.decode(b"", final=True)
            literal = table.tokens[token_id] if 0 <= token_id < len(table.tokens) else None
            out = tail + (literal or "")
            pending = False
        else:
            out = decoder.decode(data)
            pending = bool(decoder.getstate()[0])
        parts.append(out)
        n += len(out)
        ends.append(n + pending)
    tail = decoder.decode(b"", final=True)
    parts.append(tail)
    text = "".join(parts)
    return text, np.minimum(np.asarray(ends, dtype=np.int64), len(text))


@dataclass(frozen=True)
class Side:
    """One model's tokens of a prompt and its answer: ids, content coordinates (:mod:`sakd.data.chat_pair`),
    the message each token ends in (-1: template text), the answer's target tokens ``[first, stop)``, and
    the answer's text as these tokens hold it (a trimming template's reader: ``answer.strip()``)."""

    ids: list[int]
    coord: np.ndarray
    message: np.ndarray
    first: int
    stop: int
    shown: str = ""


def written_side(
    tokenizer: Any, prefix: list[dict], prompt: list[int], completion: list[int], stops: list[int]
) -> tuple[Side, str, bool]:
    """The writer's own tokens (prompt + completion, kept), the answer text and whether it ended. The answer
    is not re-rendered: the writer read its generation prompt and then its own tokens, so the answer's
    content starts where the prompt ends and holds exactly the written text (a template that trims message
    contents, as Llama 3's and Gemma's, would show it otherwise)."""
    ended = bool(completion) and completion[-1] in stops
    body = completion[:-1] if ended else completion
    answer, answer_ends = spell_answer(body, tokenizer)
    head = apply_template(tokenizer, prefix, True, "a generated answer")
    enc = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(prompt):
        raise DataError("a chat prompt does not re-tokenize to the ids it was generated from")
    before = render(tokenizer, prefix, "a chat prompt") if prefix else None
    if before is not None and not head.startswith(before.text):
        raise DataError("the chat template's generation prompt changes the conversation before it")
    a = len(head)
    contents = [*(before.contents if before else []), (a, a + len(answer))]
    ends = np.concatenate(
        [monotone_ends(enc["offset_mapping"], a), a + answer_ends, [a + len(answer) + 1] * ended]
    ).astype(np.int64)
    coord, message = content_coordinates(ends, contents)
    ids = list(prompt) + list(completion)
    return Side(ids, coord, message, len(prompt), len(ids), answer), answer, ended


def render_answer(tokenizer: Any, prefix: list[dict], answer: str, where: str) -> tuple[Rendered, int, int]:
    """``tokenizer``'s rendering of ``prefix`` + ``answer`` as the assistant message, and how many of the
    answer's characters it leaves out in front and behind: a template that trims message contents (Llama
    3's, Gemma's ``| trim``) shows ``answer.strip()``, as that model saw every answer in training."""
    try:
        return render(tokenizer, [*prefix, {"role": "assistant", "content": answer}], where), 0, 0
    except DataError:
        shown = answer.strip()
        if shown == answer:
            raise
    r = render(tokenizer, [*prefix, {"role": "assistant", "content": shown}], where)
    lead = len(answer) - len(answer.lstrip())
    return r, lead, len(answer) - len(shown) - lead


def reading_side(tokenizer: Any, prefix: list[dict], answer: str, ended: bool, where: str) -> Side:
    """``tokenizer``'s template rendering of ``prefix`` + the answer as the assistant message (as it shows
    it: :func:`render_answer`); its targets are the tokens ending in the answer turn (content, and the
    end-of-turn when ``ended``). The ids stop at the last target (the rest of the rendering predicts nothing
    that is scored). Content coordinates count the answer's characters as written, so a trimmed rendering
    aligns with the writer's."""
    r, lead, trail = render_answer(tokenizer, prefix, answer, where)
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ends = monotone_ends(enc["offset_mapping"], len(r.text))
    begin, end = r.turns[-1]
    target = ends_inside(ends, [(begin, end if ended else r.contents[-1][1])])
    head = int(np.searchsorted(ends, begin, side="right"))  # tokens ending inside the generation prompt
    hits = np.flatnonzero(target)
    first, stop = (int(hits[0]), int(hits[-1]) + 1) if hits.size else (head, head)
    coord, message = content_coordinates(ends[:stop], r.contents)
    after = ends[:stop] > r.contents[-1][1]  # past the answer: its left-out characters come first
    coord = coord + np.where(message == len(r.contents) - 1, lead, np.where(after, lead + trail, 0))
    return Side(
        list(enc["input_ids"][:stop]), coord, message, first, stop, answer[lead : len(answer) - trail]
    )


def pair_rows(student: Side, teacher: Side) -> PositionAlignment:
    """The alignment of the student's positions on the teacher's tokens, on content coordinates; only a
    position whose token and next token end in the same message's content keeps its anchor."""
    al = align_ends(student.coord, teacher.coord)
    keep = torch.from_numpy(anchorable(student.message) > 0)
    return PositionAlignment(torch.where(keep, al.anchor, -1), torch.where(keep, al.span_end, -1))


def _paired(student: Side, teacher: Side) -> Paired:
    return Paired(
        SpelledIds(student.ids, [], []), SpelledIds(teacher.ids, [], []), pair_rows(student, teacher)
    )


class ChatPrompts:
    """The prompts of each on-policy / sequence step: the training conversations cut at their last user
    turn, in the writer's template and tokens, under a batch plan of their own (see the module docstring).
    A conversation whose prompt is longer than ``max_tokens`` is left out (counted in the log).

    Args:
        conversations: the training conversations (``messages`` lists).
        writer_tokenizer: the tokenizer (and template) of the model that writes.
        plan: the run's batch plan (micro-batch, accumulation, world size, seed).
        max_tokens: ``distillation.generation.prompt_tokens``.
    """

    def __init__(
        self, conversations: list[list[dict]], writer_tokenizer: Any, plan: BatchPlan, max_tokens: int
    ):
        require_template(writer_tokenizer, "writer's")
        self.tokenizer = writer_tokenizer
        self.stop_ids = stop_ids(writer_tokenizer)
        self.prefixes: list[list[dict]] = []
        self.ids: list[list[int]] = []
        for i, messages in enumerate(conversations):
            prefix = prompt_messages(messages)
            ids = generation_prompt(writer_tokenizer, prefix, f"conversation {i}")
            if len(ids) <= max_tokens:
                self.prefixes.append(prefix)
                self.ids.append(ids)
        left_out = len(conversations) - len(self.ids)
        if left_out:
            log.info(
                "chat prompts: %d of %d conversations left out (prompt longer than "
                "distillation.generation.prompt_tokens=%d)",
                left_out,
                len(conversations),
                max_tokens,
            )
        self.plan = BatchPlan(len(self.ids), plan.micro_batch, plan.accumulation, plan.world_size, plan.seed)
        if self.plan.steps_per_epoch == 0:
            raise DataError(
                f"{len(self.ids)} training conversations have a prompt of at most distillation.generation."
                f"prompt_tokens={max_tokens} tokens; one optimizer step needs {self.plan.blocks_per_step}: "
                "raise prompt_tokens or add conversations"
            )

    def for_step(
        self, micro_batches: list[dict[str, torch.Tensor]], step: int, rank: int
    ) -> list[tuple[list[list[int]], torch.Tensor]]:
        """Per micro-batch of this rank's step: (prompt ids per row, the prompts' indices as sample ids)."""
        epoch, in_epoch = divmod(step, self.plan.steps_per_epoch)
        return [
            ([self.ids[i] for i in idx], torch.as_tensor(idx, dtype=torch.long))
            for idx in self.plan.micro_batches(epoch, in_epoch, rank)
        ]

    def rows(
        self,
        sample_ids: torch.Tensor,
        completions: list[list[int]],
        student_tok: Any,
        teacher_tok: Any | None,
        *,
        teacher_writes: bool,
    ) -> list[Row]:
        """The training rows of written answers (module docstring); ``teacher_tok`` None: one vocabulary
        and one template, the writer's tokens are everyone's."""
        out = []
        for i, completion in zip(sample_ids.tolist(), completions, strict=True):
            prompt, prefix = self.ids[i], self.prefixes[i]
            if teacher_tok is None:
                out.append(Row(list(prompt) + list(completion), len(prompt)))
                continue
            writer_tok = teacher_tok if teacher_writes else student_tok
            written, answer, ended = written_side(writer_tok, prefix, prompt, completion, self.stop_ids)
            if teacher_writes:
                student = reading_side(student_tok, prefix, answer, ended, f"conversation {i} (student)")
                out.append(Row(student.ids, student.first, _paired(student, written)))
            else:
                teacher = reading_side(teacher_tok, prefix, answer, ended, f"conversation {i} (teacher)")
                out.append(Row(written.ids, written.first, _paired(written, teacher)))
        return out


def chat_prompts(cfg: Any, writer_tokenizer: Any, plan: BatchPlan) -> ChatPrompts:
    """The run's :class:`ChatPrompts`: its training conversations (the split of :func:`split_documents`)."""
    g = cfg.distillation.generation  # generation.prompts is train (the loader's check_chat)
    train, _ = split_documents(cfg.data, cfg.training.seed)
    return ChatPrompts(list(train["messages"]), writer_tokenizer, plan, g.prompt_tokens)
