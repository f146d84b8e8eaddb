"""The evaluation on-policy distillation is for: how much the teacher agrees with what the student *writes*.

The student continues held-out prompts, greedily and by sampling; the teacher scores the continuation:
its negative log-likelihood (T = 1) of the generated text given the prompt, per generated student token
(``teacher_nll``, nats) and per UTF-8 byte of the generated text (``teacher_bpb``, bits; an EOS counts one
byte). Held-out perplexity measures the student on the data; this measures it on its own outputs, where
off-policy KD never trained it (the exposure-bias gap GKD targets). Lower is better. A degenerate student
can score well by repeating text the teacher finds easy to copy; read it next to ``tokens`` (the mean
continuation length, EOS included) and held-out perplexity.

Across tokenizers the teacher reads the same text in its own tokens (:mod:`sakd.policy.retokenize`): the
NLL is summed over the teacher tokens that end after the prompt's last character, i.e. the teacher's
probability of the continuation text; per student token it is divided by the student's token count.
"""

from __future__ import annotations

from typing import Any

import torch

from sakd.config import RunConfig
from sakd.config.generation import resolved_eval_prompts
from sakd.evaluation.heldout import rank_batches
from sakd.policy.chat_eval import chat_spec, score_chat_answers
from sakd.policy.engines import student_for_generation
from sakd.policy.models import Models
from sakd.policy.retokenize import pair_student_written, spell, text_bytes
from sakd.policy.sampling import generate, row_seed
from sakd.policy.scoring import MODES, ROLE_EVAL, ContinuationSpec, summarise, teacher_nll


def heldout_prompts(input_ids: Any, count: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of the first ``count`` held-out blocks (``[N, L]`` ids)."""
    ids = torch.as_tensor(input_ids[: min(count, len(input_ids))])
    return ids[:, :length].tolist()


def _teacher_view(
    prompt: list[int], completion: list[int], student_tok: Any, teacher_tok: Any | None
) -> tuple[list[int], int, int]:
    """(teacher ids of prompt + completion, index of the first teacher token of the continuation, bytes
    of the continuation text)."""
    ids = prompt + completion
    spelled = spell(ids, student_tok)
    n_bytes = text_bytes(spelled.pieces) - text_bytes(spell(prompt, student_tok).pieces)
    if teacher_tok is None:
        return ids, len(prompt), n_bytes
    paired = pair_student_written(ids, student_tok, teacher_tok)
    prompt_chars = spelled.spans[len(prompt) - 1][1] if prompt else 0
    first = sum(1 for _, end in paired.teacher.spans if end <= prompt_chars)
    return paired.teacher.ids, first, n_bytes


@torch.no_grad()
def score_continuations(
    student: Any,
    teacher: Any,
    spec: ContinuationSpec,
    *,
    student_tokenizer: Any,
    teacher_tokenizer: Any | None = None,
    zero_stage: int = -1,
    accelerator: Any = None,
) -> dict[str, float]:
    """The teacher's loss on the student's greedy and sampled continuations of ``spec.prompts``.

    ``student`` may be prepared (DDP, a DeepSpeed engine; ``zero_stage`` 3 gathers it for generation) or a
    plain model; ``teacher`` a model or a ZeRO-3 engine; ``teacher_tokenizer`` None when both share one
    vocabulary. With an ``accelerator`` each rank continues its share of the prompts and the sums are
    reduced (every rank runs the same number of batches: generation and a ZeRO-3 forward are collectives).
    Returns ``cont_{greedy,sampled}_{teacher_nll,teacher_bpb,tokens}`` and ``cont_prompts``.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(teacher.parameters()).device
    vocab = len(teacher_tokenizer or student_tokenizer)
    sums = torch.zeros((len(MODES), 3), dtype=torch.float64)  # nll, student tokens, bytes
    n = len(spec.prompts)
    for lo, counted in rank_batches(n, spec.batch_size, rank, world):
        rows = spec.prompts[lo : min(lo + spec.batch_size, n)]
        seeds = [row_seed(spec.seed, -1, lo + i, ROLE_EVAL) for i in range(len(rows))]
        with student_for_generation(student, zero_stage) as model:
            written = [
                generate(model, rows, spec.sampling(m), seeds=seeds, tokenizer=student_tokenizer)
                for m in MODES
            ]
        for k, completions in enumerate(written):
            views = [
                _teacher_view(p, c, student_tokenizer, teacher_tokenizer)
                for p, c in zip(rows, completions, strict=True)
            ]
            nll = teacher_nll(teacher, views, vocab, device)
            if counted:
                sums[k] += torch.tensor([nll, sum(map(len, completions)), sum(v[2] for v in views)])
    return summarise(sums, n, accelerator, world)


def continuation_summary(final_eval: dict[str, float]) -> dict[str, Any]:
    """The ``summary.json`` block of :func:`score_continuations`'s results (empty when it did not run)."""
    if "cont_prompts" not in final_eval:
        return {}
    block: dict[str, Any] = {"prompts": int(final_eval["cont_prompts"])}
    for mode in MODES:
        block[mode] = {
            key: final_eval[f"cont_{mode}_{key}"] for key in ("teacher_nll", "teacher_bpb", "tokens")
        }
    return {"student_continuations": block}


class RunContinuations:
    """The end-of-run continuation evaluation of a training run: :func:`score_continuations` with the run's
    models, prompts from its held-out blocks and its sampling settings."""

    def __init__(self, spec: ContinuationSpec, models: Models, accelerator: Any) -> None:
        self.spec, self.models, self.accelerator = spec, models, accelerator

    def __call__(self, plain_student: Any = None) -> dict[str, float]:
        """Score the prepared student, or ``plain_student`` (a whole model on every rank: the EMA)."""
        m = self.models
        student = m.student if plain_student is None else plain_student
        zero = m.zero_stage if plain_student is None else -1
        if self.spec.prefixes is not None:  # conversations: the teacher reads its own template
            return score_chat_answers(
                student,
                m.teacher,
                self.spec,
                student_tokenizer=m.student_tokenizer,
                teacher_tokenizer=m.teacher_tokenizer or m.student_tokenizer,
                zero_stage=zero,
                accelerator=self.accelerator,
            )
        return score_continuations(
            student,
            m.teacher,
            self.spec,
            student_tokenizer=m.student_tokenizer,
            teacher_tokenizer=m.teacher_tokenizer,
            zero_stage=zero,
            accelerator=self.accelerator,
        )


def build_continuations(
    cfg: RunConfig, models: Models, heldout: Any, accelerator: Any
) -> RunContinuations | None:
    """The run's continuation evaluation (None without a teacher, or when ``generation.eval_prompts``
    resolves to 0); prompts are prefixes of the held-out blocks ``heldout``."""
    g = cfg.distillation.generation
    count = resolved_eval_prompts(cfg.distillation.policy, g)
    if count == 0 or models.teacher is None:
        return None
    settings: dict[str, Any] = {
        "max_new_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "seed": cfg.training.seed,
        "batch_size": cfg.training.eval_batch_size,
    }
    if cfg.data.format == "chat":  # the held-out conversations, cut at their last user turn
        from sakd.data import split_documents

        convs = split_documents(cfg.data, cfg.training.seed)[1]
        messages = list(convs.select(range(min(count, len(convs))))["messages"])
        return RunContinuations(
            chat_spec(messages, models.student_tokenizer, **settings), models, accelerator
        )
    prompts = heldout_prompts(heldout[: min(count, len(heldout))]["input_ids"], count, g.prompt_tokens)
    return RunContinuations(ContinuationSpec(prompts, **settings), models, accelerator)
