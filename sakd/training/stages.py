"""Multi-stage training (``optimization.stages``): each stage its own length, peak LR, parameter rules
and warm-up; the trainer re-creates the optimizer and the LR schedule at each stage's first step.

Without stages a run is one stage made of the ``optimization.*`` and ``training.max_steps`` /
``num_epochs`` values, so the same code builds every run's optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sakd.config import OptimizationConfig, TrainingConfig
from sakd.errors import ConfigError
from sakd.models.peft import reset_trainable
from sakd.training.optim import build_optimizer, describe_groups, frozen_names
from sakd.training.schedules import build_scheduler


def stage_ends(ocfg: OptimizationConfig, tcfg: TrainingConfig, steps_per_epoch: int) -> list[int]:
    """The optimizer step each stage ends at (cumulative)."""
    if not ocfg.stages:
        return [tcfg.max_steps or max(1, math.floor(steps_per_epoch * tcfg.num_epochs))]
    ends, total = [], 0
    for stage in ocfg.stages:
        total += stage.steps or max(1, math.floor(steps_per_epoch * stage.epochs))
        ends.append(total)
    return ends


def stage_settings(ocfg: OptimizationConfig, stage: int) -> tuple[float, dict[str, float], int | None, str]:
    """(peak LR, parameter rules, warm-up steps or None for the default, name) of ``stage``."""
    if not ocfg.stages:
        return ocfg.learning_rate, ocfg.lr_multipliers, None, ""
    st = ocfg.stages[stage]
    rules = st.lr_multipliers if st.lr_multipliers is not None else ocfg.lr_multipliers
    return st.learning_rate or ocfg.learning_rate, rules, st.warmup_steps, st.name or f"stage-{stage}"


def check_stages(ocfg: OptimizationConfig, student: torch.nn.Module, *, zero: int, world: int) -> None:
    """Stages re-create the optimizer: under DeepSpeed with a new engine around the same module (the engine
    owns its optimizer; under ZeRO-3 the new engine takes the parameters the last one partitioned as they
    are); but DDP, like DeepSpeed, fixes the set of trainable parameters when it wraps the model. ``zero``:
    the ZeRO stage, -1 without DeepSpeed."""
    if not ocfg.stages:
        return
    frozen = {frozenset(frozen_names(student, stage_settings(ocfg, i)[1])) for i in range(len(ocfg.stages))}
    if world > 1 and len(frozen) > 1:
        raise ConfigError(
            "optimization.stages freeze different parameters, which DDP / DeepSpeed cannot follow after "
            "wrapping the model; keep the same 0.0 rules in every stage or train the stages in one process"
        )


def stage_optimizer(
    ocfg: OptimizationConfig,
    student: torch.nn.Module,
    aux: torch.nn.Module | None,
    stage: int,
    ends: list[int],
    show: Callable[[str], Any] = print,
) -> tuple[torch.optim.Optimizer, Any]:
    """A fresh optimizer (student groups + the auxiliary projections) and LR schedule for ``stage``;
    the schedule spans that stage's steps. The groups are shown with ``show``."""
    lr, rules, warmup, name = stage_settings(ocfg, stage)
    reset_trainable(student)  # this stage may train what the previous one froze (a PEFT base stays frozen)
    optimizer = build_optimizer(student, ocfg, lr=lr, rules=rules)
    if aux is not None:  # the projections train with the student (not exported)
        optimizer.add_param_group({"params": list(aux.parameters()), "lr": lr, "weight_decay": 0.0})
    label = f"stage {stage} ({name}) " if name else ""
    show(f"{label}student optimizer groups:\n" + describe_groups(optimizer.param_groups))
    length = ends[stage] - (ends[stage - 1] if stage else 0)
    if warmup is None:
        warmup = ocfg.warmup_steps or int(round(ocfg.warmup_ratio * length))
    scheduler = build_scheduler(
        ocfg.lr_scheduler, optimizer, warmup=warmup, total=length, min_lr_ratio=ocfg.min_lr_ratio
    )
    return optimizer, scheduler
