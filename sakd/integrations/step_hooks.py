"""One optimizer step of a :class:`~sakd.integrations.DistillationTrainer` as ``sakd distill`` runs it
(:meth:`sakd.training.trainer.Distiller.train_step`): the step's text under ``distillation.policy`` (the
same :class:`sakd.policy.PolicyRunner`), its global token count, and the per-step parts
(:mod:`sakd.training.hooks`: the curriculum, the token router, the Student-Aware Router).

A ``TrainerCallback`` sees no batches, so the step's beginning runs where the Trainer hands its micro-batches
over (:meth:`DistillationTrainer.get_batch_samples` calls :meth:`StepHooksCallback.begin_step`, which may
replace them by generated ones); each micro-batch's loss reads its part of the step
(:meth:`StepHooksCallback.next_micro_batch`); the callback's ``on_step_end`` lets the hooks learn from the
step's per-token means -- only after a step that was taken, as ``sakd distill``: finite loss and gradient
norm, not skipped by the fp16 loss scaler -- and ``on_save`` writes their state into the Trainer's
checkpoint (read back by :meth:`StepHooksCallback.load` on resume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sakd.config import ConfigError
from sakd.objective.composite import Objective
from sakd.objective.curriculum import StepSchedule
from sakd.policy import PolicyRunner
from sakd.training.hooks import Batch, Metric, StepExtras
from sakd.training.loop import NonFiniteError
from sakd.training.loss_scaling import MIN_LOSS_SCALE
from sakd.training.student_aware import StudentAware, detached_student


def skip_update(optimizer: Any) -> None:
    """Leave the coming ``optimizer.step()`` without effect, as ``sakd distill`` does after a non-finite
    gradient: no gradients (torch's optimizers pass over a parameter without one: no update, no weight decay,
    no moment or step count), and the step marked skipped so the Trainer leaves the LR schedule alone. Under
    fp16 loss scaling the scaler skips the step (and lowers its scale) itself."""
    if getattr(optimizer, "scaler", None) is not None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    if hasattr(optimizer, "_is_overflow"):  # Accelerate's AcceleratedOptimizer: step_was_skipped
        optimizer._is_overflow = True


@dataclass
class StepPlan:
    """What the step about to run trains with: its objective (the run's, or an on-policy step's), schedule
    (an on-policy step's at T = 1), whether the objective reads the teacher, and the rollout's metrics."""

    objective: Objective
    schedule: StepSchedule
    use_teacher: bool = True
    metrics: dict[str, float] = field(default_factory=dict)


class StepHooksCallback(TrainerCallback):
    """Runs ``aware``'s hooks and ``policy``'s rollouts around each optimizer step of a Trainer (module
    docstring)."""

    def __init__(
        self,
        aware: StudentAware,
        objective: Objective,
        policy: PolicyRunner | None = None,
        max_consecutive_skips: int = 5,
    ) -> None:
        self.aware, self.objective, self.policy = aware, objective, policy
        if max_consecutive_skips < 1:
            raise ConfigError(f"max_consecutive_skips must be at least 1, not {max_consecutive_skips}")
        self.max_consecutive_skips, self.consecutive_skips = max_consecutive_skips, 0
        self.plan = StepPlan(objective, aware.schedule(0, 1))
        self.extras, self.index = StepExtras(), 0
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.metrics: dict[str, Metric] = {}
        self.taken = True  # the last step's gradient norm was finite (see on_step_end)

    @property
    def active(self) -> bool:
        return bool(self.aware.hooks)

    def begin_step(
        self, step: int, total_steps: int, micro_batches: list[Batch], student: Any
    ) -> tuple[list[Batch], int]:
        """Before the step's first micro-batch: its text (generated on a policy step), its global count of
        valid tokens, every hook's ``before_step``. ``student``: the prepared module. Returns the
        micro-batches the step trains on and the count."""
        schedule = self.aware.schedule(step, total_steps)
        plan = StepPlan(self.objective, schedule)
        if self.policy is not None:
            self.policy.models.student = student  # the prepared module, once the Trainer made it
            rollout = self.policy.rollout(micro_batches, step)
            micro_batches = rollout.micro_batches
            plan = StepPlan(
                rollout.objective, rollout.schedule(schedule), rollout.teacher_needed, rollout.metrics
            )
        local = sum(int(plan.objective.valid_mask(b["labels"]).sum()) for b in micro_batches)
        total = int(self.aware._reduce(torch.tensor(local), "sum").item())
        self.extras = StepExtras()
        if self.active and micro_batches:
            self.extras = self.aware.before_step(
                step,
                micro_batches,
                plan.schedule,
                total,
                partial(detached_student, student),
                use_teacher=plan.use_teacher,
            )
        self.plan, self.metrics = plan, {**self.extras.metrics, **plan.metrics}
        self.index, self.sums, self.tokens, self.taken = 0, {}, total, True
        return micro_batches, total

    def next_micro_batch(self) -> tuple[int, StepExtras]:
        """The index of the micro-batch about to run in its step, and the step's extras."""
        index, self.index = self.index, self.index + 1
        return index, self.extras

    def after_micro_batch(self, sums: dict[str, torch.Tensor]) -> None:
        """After the loss of the micro-batch :meth:`next_micro_batch` last handed out."""
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().double()
        self.aware.after_micro_batch(self.index - 1, sums)

    def grad_norm(self, norm: object, trainer: Any = None) -> None:
        """The step's pre-clip gradient norm (None: not measured): a non-finite one means the step is not
        taken, as ``sakd distill`` skips it: not for the hooks, and not for the weights either (the
        ``trainer``'s optimizer; under DeepSpeed the engine skips such a step itself).
        ``max_consecutive_skips`` such steps in a row raise :class:`~sakd.training.loop.NonFiniteError`, as in
        ``sakd distill``; an fp16 overflow is not one (the loss scaler skips it and lowers its scale:
        DeepSpeed's fp16 engine, or a GradScaler whose scale is not below
        :data:`~sakd.training.loss_scaling.MIN_LOSS_SCALE`)."""
        self.taken = norm is None or math.isfinite(float(norm))  # type: ignore[arg-type]
        if self.taken:
            self.consecutive_skips = 0
            return
        deepspeed = trainer is not None and trainer.is_deepspeed_enabled
        optimizer = None if trainer is None or deepspeed else trainer.optimizer
        if optimizer is not None:
            skip_update(optimizer)
        scaler = getattr(optimizer, "scaler", None)
        # DeepSpeed's fp16 engine: Accelerate's mixed_precision is read from the engine's own config
        ds_fp16 = deepspeed and trainer.accelerator.mixed_precision == "fp16"
        if ds_fp16 or (scaler is not None and scaler.get_scale() >= MIN_LOSS_SCALE):
            return
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            # close the unscale_ that clip_grad_norm_ did, so that a later train() can unscale again
            if scaler is not None:
                scaler.update()
            raise NonFiniteError(
                f"{self.consecutive_skips} optimizer steps in a row had a non-finite gradient norm; stopped -- "
                "the newest checkpoint holds the last good weights (lower the learning rate or check the data; "
                "DistillationTrainer(max_consecutive_skips=...) sets how many)"
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        """The step's global per-token means (all ranks) to the hooks, when the step was taken: finite loss
        and gradient norm, and no fp16 overflow skip (the Trainer leaves its schedule alone then, too)."""
        optimizer: Any = kwargs.get("optimizer")
        if getattr(optimizer, "scaler", True) is None:  # skip_update's mark off: the next step steps again
            optimizer._is_overflow = False
        if not self.active or not self.sums or not self.tokens:
            return
        keys = sorted(self.sums)
        totals = self.aware._reduce(torch.stack([self.sums[k] for k in keys]), "sum").tolist()
        means = {k: v / self.tokens for k, v in zip(keys, totals, strict=True)}
        skipped = self.aware.accelerator.optimizer_step_was_skipped
        if self.taken and not skipped and all(math.isfinite(v) for v in means.values()):
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
