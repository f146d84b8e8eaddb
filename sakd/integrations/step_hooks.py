"""The per-step parts of a run (:mod:`sakd.training.hooks`: the curriculum, the token router, the
Student-Aware Router) under ``transformers.Trainer``, as ``sakd distill`` runs them.

A ``TrainerCallback`` sees no batches, so the step's beginning runs where the Trainer hands its micro-batches
over (:meth:`DistillationTrainer.get_batch_samples` calls :meth:`StepHooksCallback.begin_step`); each
micro-batch's loss reads its part of the step's extras (:meth:`StepHooksCallback.next_micro_batch`); the
callback's ``on_step_end`` lets the hooks learn from the step's per-token means, and ``on_save`` writes their
state into the Trainer's checkpoint (read back by :meth:`StepHooksCallback.load` on resume).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sakd.models.forward import HiddenAndHead
from sakd.objective.curriculum import StepSchedule
from sakd.training.hooks import Batch, Metric, StepExtras
from sakd.training.student_aware import StudentAware


class StepHooksCallback(TrainerCallback):
    """Runs ``aware``'s hooks around each optimizer step of a Trainer (module docstring)."""

    def __init__(self, aware: StudentAware) -> None:
        self.aware = aware
        self.extras, self.index = StepExtras(), 0
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.metrics: dict[str, Metric] = {}

    @property
    def active(self) -> bool:
        return bool(self.aware.hooks)

    def begin_step(
        self,
        step: int,
        micro_batches: list[Batch],
        schedule: StepSchedule,
        global_tokens: int,
        student_out: Callable[[Batch], HiddenAndHead],
    ) -> None:
        """Before the step's first micro-batch: every hook's ``before_step`` on the step's micro-batches."""
        self.extras = self.aware.before_step(step, micro_batches, schedule, global_tokens, student_out)
        self.metrics = dict(self.extras.metrics)
        self.index, self.sums, self.tokens = 0, {}, global_tokens

    def next_micro_batch(self) -> tuple[int, StepExtras]:
        """The index of the micro-batch about to run in its step, and the step's extras."""
        index, self.index = self.index, self.index + 1
        return index, self.extras

    def after_micro_batch(self, sums: dict[str, torch.Tensor]) -> None:
        """After the loss of the micro-batch :meth:`next_micro_batch` last handed out."""
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().double()
        self.aware.after_micro_batch(self.index - 1, sums)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        """The step's global per-token means (all ranks) to the hooks, when the step's loss was finite."""
        if not self.sums or not self.tokens:
            return
        keys = sorted(self.sums)
        totals = self.aware._reduce(torch.stack([self.sums[k] for k in keys]), "sum").tolist()
        means = {k: v / self.tokens for k, v in zip(keys, totals, strict=True)}
        if all(math.isfinite(v) for v in means.values()):
            self.aware.after_step(means)
        self.sums = {}

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        if state.is_world_process_zero:
            self.aware.save(Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def load(self, directory: str) -> None:
        """The hooks' state from a Trainer checkpoint (what :meth:`on_save` wrote)."""
        self.aware.load(Path(directory))
