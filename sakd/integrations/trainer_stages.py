"""``optimization.stages`` under a :class:`~sakd.integrations.DistillationTrainer`: at each stage's first
optimizer step a callback replaces the Trainer's optimizer and LR schedule with the stage's, built by the same
:func:`sakd.training.stages.stage_optimizer` as ``sakd distill`` (the stage's peak LR, parameter rules --
0.0 freezes -- and warm-up; the schedule spans the stage). The weights, the step counter, the data order and
the per-step hooks' state carry on, as in ``sakd distill``. Stages are given in steps (an epoch of ``sakd
distill`` counts whole steps, the Trainer's its last partial one too) and ``TrainingArguments.max_steps`` must
be their total; stages run in one process without DeepSpeed (``sakd distill`` runs them under ZeRO-1/2).

    trainer = DistillationTrainer(...)
    trainer.add_callback(TrainerStages(trainer, {"stages": [{"steps": 500, "lr_multipliers": {...}}, ...]}))
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from sakd.config import ConfigError, OptimizationConfig, TrainingConfig, load_config
from sakd.training.stages import check_stages, stage_ends, stage_optimizer

log = logging.getLogger(__name__)


class TrainerStages(TrainerCallback):
    """The stages of ``optimization`` (an ``optimization`` section: dataclass or dict) for ``trainer``."""

    def __init__(self, trainer: Any, optimization: OptimizationConfig | dict) -> None:
        if not isinstance(optimization, OptimizationConfig):
            optimization = load_config({"optimization": optimization})[0].optimization
        if not optimization.stages:
            raise ConfigError("TrainerStages needs optimization.stages: none given")
        if trainer.is_deepspeed_enabled:
            raise ConfigError(
                "optimization.stages under DistillationTrainer run without DeepSpeed (the engine owns its "
                "optimizer); under ZeRO-1/2 use `sakd distill`"
            )
        for i, stage in enumerate(optimization.stages):
            if stage.steps is None:  # sakd distill's epoch (whole steps) is not the Trainer's (ceil-based)
                raise ConfigError(f"optimization.stages[{i}]: TrainerStages takes stages in steps: set steps")
        args, world = trainer.args, trainer.accelerator.num_processes
        self.ends = stage_ends(optimization, TrainingConfig(), 1)  # every stage in steps
        if args.max_steps != self.ends[-1]:
            raise ConfigError(
                f"TrainingArguments.max_steps={args.max_steps} differs from the stages' total of {self.ends[-1]} "
                "steps: set max_steps to it"
            )
        check_stages(optimization, trainer.student, zero=-1, world=world)
        self.trainer, self.ocfg, self.stage = trainer, optimization, -1

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: object
    ) -> None:
        """At a stage's first step (the run's first included): the stage's optimizer and schedule."""
        stage = sum(state.global_step >= end for end in self.ends[:-1])
        if stage == self.stage:
            return
        if state.global_step not in (0, *self.ends[:-1]):
            raise ConfigError("TrainerStages cannot resume inside a stage: resume at a stage boundary")
        t, self.stage = self.trainer, stage
        optimizer, scheduler = stage_optimizer(self.ocfg, t.student, t.model.aux, stage, self.ends, log.info)
        acc = t.accelerator
        if t.optimizer in acc._optimizers:  # the previous stage's (or the Trainer's own) optimizer
            acc._optimizers.remove(t.optimizer)
        t.optimizer, t.lr_scheduler = acc.prepare_optimizer(optimizer), scheduler
        t.callback_handler.optimizer, t.callback_handler.lr_scheduler = t.optimizer, scheduler
