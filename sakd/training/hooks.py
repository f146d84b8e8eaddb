"""Per-step parts as hooks: a part of the optimizer step that acts on the whole step -- not on one
micro-batch -- implements :class:`StepHook` (before the step, after each micro-batch, after the step, its
state in checkpoints). ``sakd distill``'s step (:class:`sakd.training.trainer.Distiller`) and
:class:`sakd.integrations.DistillationTrainer` (through a ``transformers.TrainerCallback``) run the same
hooks: the curriculum (:class:`CurriculumHook`), the token router (:class:`TokenRouterHook`) and the
Student-Aware Router (:class:`sakd.training.student_aware.SARHook`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import torch
from safetensors.torch import load_file, save_file

from sakd.models.capture import RouterSignal
from sakd.models.forward import HiddenAndHead
from sakd.objective.composite import Objective
from sakd.objective.curriculum import Curriculum, StepSchedule
from sakd.objective.router import Reduce, TokenRouter, token_signals, weight_stats
from sakd.teacher.signal import TeacherOutput, TeacherSignal

STATE_FILE = "student_aware.json"
ROUTER_FILE = "token_router.safetensors"
Batch = dict[str, torch.Tensor]
Metric = object  # a number, or a list of them (metrics.jsonl)


@dataclass
class StepInputs:
    """What a hook sees of the step about to run: its micro-batches (this rank's), the schedule, the step's
    global token count, the student's detached outputs (computed once, shared by the hooks) and whether the
    step's objective reads the teacher."""

    step: int
    micro_batches: list[Batch]
    schedule: StepSchedule
    global_tokens: int
    student_out: Callable[[Batch], HiddenAndHead]
    use_teacher: bool = True
    _students: list[HiddenAndHead] | None = None

    def students(self) -> list[HiddenAndHead]:
        if self._students is None:
            self._students = [self.student_out(mb) for mb in self.micro_batches]
        return self._students


@dataclass
class StepExtras:
    """What the hooks hand to the step: teacher signals and KD weights per micro-batch (None when not used),
    the curriculum's multipliers and metrics for metrics.jsonl."""

    teacher_outs: list[TeacherOutput] | None = None
    kd_weights: list[torch.Tensor] | None = None
    multipliers: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)

    def teacher_out(self, i: int, mb: Batch, signal: TeacherSignal | None) -> TeacherOutput | None:
        """Micro-batch ``i``'s teacher signal: the one kept for the step, else a fresh one (None: no teacher)."""
        if self.teacher_outs is not None:
            return self.teacher_outs[i]
        return None if signal is None else signal(mb)

    def objective_kwargs(self, i: int) -> dict[str, torch.Tensor | dict[str, float]]:
        """What the objective of micro-batch ``i`` gets besides the tensors (nothing when all is off)."""
        kwargs: dict[str, torch.Tensor | dict[str, float]] = {}
        if self.multipliers:
            kwargs["multipliers"] = self.multipliers
        if self.kd_weights is not None:
            kwargs["kd_weights"] = self.kd_weights[i]
        return kwargs


class StepHook(Protocol):
    """A per-step part. ``describe``: one line, what it does and the metrics it logs."""

    def describe(self) -> str: ...

    def before_step(self, step: StepInputs, extras: StepExtras) -> None: ...

    def after_micro_batch(self, index: int, sums: dict[str, torch.Tensor]) -> None: ...

    def after_step(self, step_means: dict[str, float]) -> None:
        """After a taken step (finite loss and gradient), with the step's global per-token means."""

    def save(self, directory: Path) -> None:
        """Write the state that determines the next steps into a checkpoint (main process)."""

    def load(self, directory: Path) -> None: ...


class CurriculumHook:
    """Loss phases and magnitude balancing: the step's multipliers; the balancer learns after the step."""

    def __init__(self, curriculum: Curriculum) -> None:
        self.curriculum = curriculum

    def describe(self) -> str:
        cfg = self.curriculum.cfg
        parts = ["loss curriculum: KD first, then structure terms, then all"] if cfg.phases else []
        parts += ["magnitude balancing of the loss components"] if cfg.balance else []
        return "; ".join(parts) + "; logs mult_*"

    def before_step(self, step: StepInputs, extras: StepExtras) -> None:
        extras.multipliers = step.schedule.multipliers
        extras.metrics.update({f"mult_{c}": v for c, v in sorted(step.schedule.multipliers.items())})

    def after_micro_batch(self, index: int, sums: dict[str, torch.Tensor]) -> None:
        """Nothing per micro-batch."""

    def after_step(self, step_means: dict[str, float]) -> None:
        self.curriculum.update(step_means)

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps({"balancer": self.curriculum.state_dict()}))

    def load(self, directory: Path) -> None:
        path = directory / STATE_FILE
        if path.is_file():
            self.curriculum.load_state_dict(json.loads(path.read_text()).get("balancer", {}))


class TokenRouterHook:
    """The token router: the teacher signals of every micro-batch (kept for the step) and the per-token KD
    weights over the whole step (:mod:`sakd.objective.router`)."""

    def __init__(
        self,
        router: TokenRouter,
        objective: Objective,
        signal: TeacherSignal,
        chunk_size: int,
        reduce: Reduce,
    ) -> None:
        self.router, self.objective, self.signal = router, objective, signal
        self.chunk_size, self.reduce = chunk_size, reduce

    def describe(self) -> str:
        return "token router: KD weighted per token by gap/confidence/trend/expert; logs router_w_*"

    def before_step(self, step: StepInputs, extras: StepExtras) -> None:
        if not step.use_teacher:
            return
        extras.teacher_outs = [self.signal(mb) for mb in step.micro_batches]
        spec = self.objective.spec.at_temperature(step.schedule.temperature).kd
        live = self.signal.capabilities.live
        signals = []
        for mb, s_out, t_out in zip(step.micro_batches, step.students(), extras.teacher_outs, strict=True):
            rows = self.objective.kd_rows(s_out, t_out, mb["labels"][:, 1:].reshape(-1), mb)
            router = cast(RouterSignal | None, t_out.router) if live else None  # a cache's: in the rows
            signals.append(token_signals(rows, spec, router, self.chunk_size))
        weights = self.router.weights(signals, step.schedule.sharpness, self.reduce)
        stats = weight_stats(weights, signals, self.reduce)
        stats["router_sharpness"] = step.schedule.sharpness
        self.router.update(signals, self.reduce)
        extras.kd_weights = weights
        extras.metrics.update(stats)

    def after_micro_batch(self, index: int, sums: dict[str, torch.Tensor]) -> None:
        """Nothing per micro-batch."""

    def after_step(self, step_means: dict[str, float]) -> None:
        """The statistics were updated before the step, from the step's own gaps."""

    def save(self, directory: Path) -> None:
        state = {k: v.contiguous() for k, v in self.router.state_dict().items()}
        save_file(state, str(directory / ROUTER_FILE))

    def load(self, directory: Path) -> None:
        if (directory / ROUTER_FILE).is_file():
            self.router.load_state_dict(load_file(str(directory / ROUTER_FILE)))
