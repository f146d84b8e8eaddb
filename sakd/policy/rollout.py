"""One optimizer step's data under ``distillation.policy``: the blocks of the step (off-policy), or
sequences the student (on-policy) or the teacher (sequence-level KD) writes from the step's prompts.

=========  =================================================================================================
policy     a step trains on
=========  =================================================================================================
off        the data (no :class:`PolicyRunner` is built)
on         the student's samples of the step's prompts, scored by the teacher: ``alpha = 1`` (no CE on the
           student's own tokens), the divergence of ``distillation.loss`` (``jsd`` with ``beta``, ``rkl``,
           ``fkl``, ...) at T = 1, without a T² factor, on the generated positions only -- GKD (Agarwal et
           al. 2024; TRL's GKDTrainer likewise), MiniLLM's reverse KL (Gu et al. 2024) on the student's
           samples. ``generation.temperature`` shapes only the sampling; ``distillation.loss.temperature``
           (and its schedule) applies to the off-policy steps
mixed      with probability ``generation.fraction`` (λ) an ``on`` step, else an ``off`` one; the draw is a
           pure function of (seed, step), so λ = 0 is exactly ``off`` and a resumed run makes the same draws.
           The ``off`` steps are this project's off-policy KD (the ``distillation.loss`` blend with CE, at
           the loss temperature with T², on every token of the data), not GKD's off-policy steps (the same
           divergence at T = 1 on a dataset's completion tokens only)
sequence   the teacher's samples of the step's prompts (Kim & Rush 2016): CE on them
           (``sequence_loss: ce``, no teacher forward) or the ``distillation.loss`` blend (``kd``, at the
           loss temperature, as off-policy KD)
=========  =================================================================================================

Over conversations (``data.format: chat``) the prompts and rows are those of :mod:`sakd.policy.chat_answers`.

A step is of one kind on every rank and micro-batch (the draw does not depend on the rank), so the
step's token count, and hence its normalisation, stays global, and under ZeRO-3 every rank enters the
parameter gather of the generation together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sakd.config import RunConfig
from sakd.data import BatchPlan
from sakd.errors import ConfigError
from sakd.objective.composite import Objective
from sakd.objective.curriculum import StepSchedule
from sakd.policy.batches import collate, student_written, teacher_written
from sakd.policy.chat_answers import ChatPrompts, chat_prompts
from sakd.policy.engines import student_for_generation, teacher_for_generation
from sakd.policy.models import Models
from sakd.policy.prompts import Prompts
from sakd.policy.sampling import Sampling, generate, row_seed

ROLE_STUDENT, ROLE_TEACHER = 1, 2  # folded into the sampling seeds: the two writers never share a stream
ON_POLICY_TEMPERATURE = 1.0  # GKD scores the student's samples at T = 1 (so no T² factor either)


def with_alpha(objective: Objective, alpha: float) -> Objective:
    """The same objective (divergence, temperature, vocabulary bridge, auxiliary terms) with another
    KD / CE blend."""
    return Objective(
        dataclasses.replace(objective.cfg, alpha=alpha),
        vocab_size=objective.vocab_size,
        teacher_vocab_size=objective.teacher_vocab_size,
        bridge=objective.bridge,
        distillation=objective.dcfg,
        aux=objective.aux,
        seed=objective.seed,
        teacher=objective.teacher,
    )


def is_policy_step(policy: str, fraction: float, seed: int, step: int) -> bool:
    """Whether optimizer step ``step`` trains on generated text (a pure function: exact resume)."""
    if policy in ("on", "sequence"):
        return True
    if policy != "mixed" or fraction <= 0:
        return False
    g = torch.Generator().manual_seed(row_seed(seed, step, 0x6D69786564))
    return bool(torch.rand((), generator=g) < fraction)


@dataclass
class Rollout:
    """What one step trains on: its micro-batches, the objective, whether the objective needs the teacher's
    forward, the generation's cost for ``metrics.jsonl`` and the loss temperature of the step (None: the
    schedule's; :data:`ON_POLICY_TEMPERATURE` on the student's samples)."""

    micro_batches: list[dict[str, torch.Tensor]]
    objective: Objective
    teacher_needed: bool
    metrics: dict[str, float] = field(default_factory=dict)
    temperature: float | None = None

    def schedule(self, schedule: StepSchedule) -> StepSchedule:
        """The step's schedule with this rollout's loss temperature (unchanged when it has none)."""
        return (
            schedule
            if self.temperature is None
            else dataclasses.replace(schedule, temperature=self.temperature)
        )


class PolicyRunner:
    """Builds each step's :class:`Rollout` for ``distillation.policy`` on / mixed / sequence."""

    def __init__(
        self,
        cfg: RunConfig,
        objective: Objective,
        models: Models,
        prompts: Prompts | ChatPrompts,
        accelerator: Any,
    ) -> None:
        d = cfg.distillation
        self.policy, self.gcfg, self.seed = d.policy, d.generation, cfg.training.seed
        self.models, self.prompts, self.accelerator = models, prompts, accelerator
        self.off_objective = objective
        sequence = d.policy == "sequence"
        alpha = (0.0 if d.generation.sequence_loss == "ce" else d.loss.alpha) if sequence else 1.0
        self.objective = objective if alpha == objective.cfg.alpha else with_alpha(objective, alpha)
        self.teacher_needed = alpha > 0 or objective.aux is not None
        self.sampling = Sampling(d.generation.max_new_tokens, d.generation.temperature, d.generation.top_p)

    @property
    def teacher_writes(self) -> bool:
        return self.policy == "sequence"

    def rollout(self, micro_batches: list[dict[str, torch.Tensor]], step: int) -> Rollout:
        """The step's data: ``micro_batches`` themselves on an off-policy step, else generated ones."""
        if not is_policy_step(self.policy, self.gcfg.fraction, self.seed, step):
            return Rollout(micro_batches, self.off_objective, True, {"policy_step": 0})
        t0 = time.perf_counter()
        acc = self.accelerator
        prompts = self.prompts.for_step(micro_batches, step, acc.process_index)
        role = ROLE_TEACHER if self.teacher_writes else ROLE_STUDENT
        gen_seconds, generated, batches = 0.0, 0, []
        with self.writer() as write:  # under ZeRO-3: one parameter gather for the whole step
            for rows, sample_ids in prompts:
                seeds = [row_seed(self.seed, step, int(i), role) for i in sample_ids.tolist()]
                t_gen = time.perf_counter()
                completions = write(rows, self.sampling, seeds)
                gen_seconds += time.perf_counter() - t_gen
                generated += sum(len(c) for c in completions)
                batches.append(self._collate(rows, completions, sample_ids))
        totals = acc.reduce(torch.tensor([float(generated)], device=acc.device), reduction="sum")
        seconds = acc.reduce(torch.tensor([gen_seconds, time.perf_counter() - t0], device=acc.device), "max")
        gen_tokens, (gen_s, rollout_s) = int(totals.item()), seconds.tolist()
        metrics = {
            "policy_step": 1,
            "gen_tokens": gen_tokens,
            "gen_seconds": gen_s,
            "gen_tokens_per_s": gen_tokens / max(gen_s, 1e-9),
            "rollout_seconds": rollout_s,
        }
        temperature = None if self.teacher_writes else ON_POLICY_TEMPERATURE
        return Rollout(batches, self.objective, self.teacher_needed, metrics, temperature)

    @contextlib.contextmanager
    def writer(self) -> Iterator[Callable[[list[list[int]], Sampling, list[int]], list[list[int]]]]:
        """``write(prompts, sampling, seeds) -> completions`` with the model that writes this run's text
        (the teacher for sequence-level KD, else the student), whole for the duration."""
        m, acc = self.models, self.accelerator
        if self.teacher_writes:
            model, synced = teacher_for_generation(m.teacher, m.teacher_placement, acc.num_processes)
            tok = m.teacher_tokenizer or m.student_tokenizer
        else:
            model, synced, tok = None, False, m.student_tokenizer
        with contextlib.ExitStack() as stack:
            if model is None:
                model = stack.enter_context(student_for_generation(m.student, m.zero_stage))
            stack.enter_context(acc.autocast())

            stops = self.prompts.stop_ids

            def write(prompts: list[list[int]], sampling: Sampling, seeds: list[int]) -> list[list[int]]:
                return generate(
                    model, prompts, sampling, seeds=seeds, tokenizer=tok, synced_gpus=synced, stop_ids=stops
                )

            yield write

    def _collate(
        self, prompts: list[list[int]], completions: list[list[int]], sample_ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        m = self.models
        if isinstance(self.prompts, ChatPrompts):  # conversations: each model reads its own template
            rows = self.prompts.rows(
                sample_ids,
                completions,
                m.student_tokenizer,
                m.teacher_tokenizer,
                teacher_writes=self.teacher_writes,
            )
        else:
            write = teacher_written if self.teacher_writes else student_written
            rows = write(prompts, completions, m.student_tokenizer, m.teacher_tokenizer)
        t_tok = m.teacher_tokenizer
        batch = collate(
            rows,
            sample_ids,
            pad_id=_pad_id(m.student_tokenizer),
            teacher_pad_id=_pad_id(t_tok) if t_tok is not None else 0,
            mask_unanchored=not self.teacher_writes,
        )
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(tokenizer.eos_token_id if pad is None else pad)


def build_policy(
    cfg: RunConfig, objective: Objective, models: Models, plan: BatchPlan, accelerator: Any
) -> PolicyRunner | None:
    """The runner of ``distillation.policy`` (None for ``off``), with its prompt source."""
    d = cfg.distillation
    if d.policy == "off":
        return None
    teacher_writes = d.policy == "sequence"
    writer_tok = (models.teacher_tokenizer if teacher_writes else None) or models.student_tokenizer
    writer = models.teacher if teacher_writes else models.student
    limit = getattr(getattr(writer, "config", None), "max_position_embeddings", None)
    length = d.generation.prompt_tokens + d.generation.max_new_tokens
    if isinstance(limit, int) and length > limit:
        raise ConfigError(
            f"distillation.generation.prompt_tokens + max_new_tokens = {length} exceeds the "
            f"{'teacher' if teacher_writes else 'student'}'s {limit} positions; lower them"
        )
    if cfg.data.format == "chat":
        return PolicyRunner(cfg, objective, models, chat_prompts(cfg, writer_tok, plan), accelerator)
    prompts = Prompts(
        d.generation,
        models.student_tokenizer,
        writer_tok,
        plan,
        retokenize=teacher_writes and models.teacher_tokenizer is not None,
    )
    return PolicyRunner(cfg, objective, models, prompts, accelerator)
