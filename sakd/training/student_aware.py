"""The student-aware parts of a run, as per-step hooks (:mod:`sakd.training.hooks`), in one place so the
step itself stays readable:

1. :meth:`StudentAware.schedule` -- the curriculum's temperature, per-component multipliers and router
   sharpness for this step (:mod:`sakd.objective.curriculum`);
2. :meth:`StudentAware.before_step` -- before the student's micro-batches, each hook that is on: one update
   of the Student-Aware Router (:class:`SARHook`, :mod:`sakd.teacher.moe_router`) on this step's blocks; the
   token router's teacher signals and per-token KD weights over the whole step
   (:class:`~sakd.training.hooks.TokenRouterHook`); the curriculum's multipliers
   (:class:`~sakd.training.hooks.CurriculumHook`);
3. :meth:`StudentAware.after_step` -- the balancer learns the step's magnitudes.

Their state (the SAR offsets and optimizer, the router's running statistics, the balancer's magnitudes) is
written into every checkpoint by :meth:`save` and read back by :meth:`load`, so a resumed run is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sakd.config import RunConfig
from sakd.models.forward import HiddenAndHead, hidden_and_head
from sakd.objective.composite import IGNORE_INDEX, Objective
from sakd.objective.curriculum import Curriculum, StepSchedule
from sakd.objective.router import Reduce, TokenRouter
from sakd.objective.terms import component_weights
from sakd.teacher.moe import bare_model, override_routing
from sakd.teacher.moe_router import StudentAwareRouter, router_kd_sum, router_terms
from sakd.teacher.routed import RoutedTeacher
from sakd.teacher.signal import TeacherSignal
from sakd.training.hooks import (
    Batch,
    CurriculumHook,
    Metric,
    StepExtras,
    StepHook,
    StepInputs,
    TokenRouterHook,
)


def detached_student(student: Any, mb: Batch) -> HiddenAndHead:
    """The student's hidden states and head for ``mb`` without gradients, through the prepared (DDP /
    DeepSpeed) module (under ZeRO-3 :func:`~sakd.models.forward.output_head` copies the gathered head)."""

    def forward(module: Any) -> HiddenAndHead:
        out = hidden_and_head(module.module, module.module, mb["input_ids"], mb["attention_mask"])
        bias = None if out.head_bias is None else out.head_bias.detach()
        return HiddenAndHead(out.hidden.detach(), out.head_weight.detach(), bias)

    with torch.no_grad():
        return student(loss_fn=forward)


class SARHook:
    """One Student-Aware Router update on the step's blocks (paper Algorithm 2, before the student step).

    The KD term is divided by the step's global count of valid tokens, the anchor by the global count of the
    teacher's real tokens, so both are per-token means however the step is split; the balance term is per
    micro-batch, weighted by its share of the teacher's tokens."""

    def __init__(
        self,
        sar: StudentAwareRouter,
        cfg: RunConfig,
        objective: Objective,
        signal: RoutedTeacher,
        reduce: Reduce,
    ) -> None:
        self.sar, self.cfg, self.objective, self.signal, self._reduce = sar, cfg, objective, signal, reduce

    def describe(self) -> str:
        return "Student-Aware Router: the teacher's routers learn from the student's gap; logs sar_*"

    def before_step(self, step: StepInputs, extras: StepExtras) -> None:
        if step.use_teacher:
            extras.metrics.update(
                self._router_step(
                    step.micro_batches, step.students(), step.global_tokens, step.schedule.temperature
                )
            )

    def after_micro_batch(self, index: int, sums: dict[str, torch.Tensor]) -> None:
        """Nothing per micro-batch."""

    def after_step(self, step_means: dict[str, float]) -> None:
        """The router stepped before the student did."""

    def save(self, directory: Path) -> None:
        self.sar.save(directory)

    def load(self, directory: Path) -> None:
        self.sar.load(directory)

    def _router_step(
        self,
        micro_batches: list[Batch],
        students: list[HiddenAndHead],
        global_tokens: int,
        temperature: float,
    ) -> dict[str, Metric]:
        moe, chunk = self.cfg.distillation.moe, self.cfg.distillation.loss.chunk_size
        # the bare module, also under a ZeRO-3 teacher engine: its parameter hooks still gather (and, in this
        # backward, re-gather) the partitions, while the engine's own backward hooks would demand an optimizer
        teacher = bare_model(self.signal.model)
        masks = [self.signal.inputs(mb)[1].reshape(-1).bool() for mb in micro_batches]
        t_tokens = float(self._reduce(torch.tensor(float(sum(int(m.sum()) for m in masks))), "sum"))
        totals: dict[str, torch.Tensor] = {}
        for mb, s_out, mask in zip(micro_batches, students, masks, strict=True):
            ids, attn = self.signal.inputs(mb)
            routing = self.sar.routing(record=True)
            with torch.enable_grad(), override_routing(teacher, routing):
                t_out = hidden_and_head(teacher, teacher, ids, attn)
                targets = mb["labels"][:, 1:].reshape(-1)
                rows = self.objective.kd_rows(s_out, t_out, targets, mb)
                valid = (
                    targets != IGNORE_INDEX
                    if rows.kd_mask is None
                    else (targets != IGNORE_INDEX) & rows.kd_mask
                )
                kd = router_kd_sum(rows.student, rows.teacher, valid, temperature, rows.bridge, chunk)
                terms = router_terms(routing.recorded, mask.to(ids.device))
                loss = (
                    kd / global_tokens
                    + moe.router_balance_coef * terms.balance * (terms.tokens / t_tokens)
                    + moe.router_anchor_coef * terms.anchor_sum / t_tokens
                )
                loss.backward()
            part = {
                "kd": kd.detach().double(),
                "balance": (terms.balance.detach() * terms.tokens).double(),
                "drift": terms.drift.double(),
                "entropy": terms.entropy.double(),
                "max_gate": terms.max_gate.double(),
            }
            totals = {k: totals.get(k, 0) + v for k, v in part.items()}
        norm = self.sar.update(self._reduce)
        keys = sorted(totals)
        flat = self._reduce(torch.cat([totals[k].reshape(-1) for k in keys]), "sum").cpu()
        parts = dict(zip(keys, flat.split([totals[k].numel() for k in keys]), strict=True))
        drift = (parts["drift"] / t_tokens).tolist()
        return {
            "sar_kd": float(parts["kd"]) / global_tokens,
            "sar_balance": float(parts["balance"]) / t_tokens,
            "sar_drift": sum(drift) / len(drift),
            "sar_drift_layers": [round(x, 6) for x in drift],
            "sar_gate_entropy": float(parts["entropy"].mean()) / t_tokens,
            "sar_max_gate": float(parts["max_gate"].mean()) / t_tokens,
            "sar_grad_norm": norm,
        }


class StudentAware:
    """Curriculum, token router and Student-Aware Router of one run, as hooks (module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        objective: Objective,
        accelerator: Any,
        signal: TeacherSignal | None,
        sar: StudentAwareRouter | None,
        vocab_size: int,
    ) -> None:
        d = cfg.distillation
        self.cfg, self.accelerator, self.signal = cfg, accelerator, signal
        self.curriculum = Curriculum(d.loss, d.curriculum, d.router, component_weights(d))
        self.augmenting = signal is not None and signal.capabilities.routing == "ka"
        self.hooks: list[StepHook] = []
        if sar is not None:
            self.hooks.append(SARHook(sar, cfg, objective, signal, self._reduce))  # type: ignore[arg-type]
        if d.router.enabled and signal is not None:
            router = TokenRouter(d.router, vocab_size)
            self.hooks.append(TokenRouterHook(router, objective, signal, d.loss.chunk_size, self._reduce))
        self.balance = CurriculumHook(self.curriculum)
        if self.curriculum.active:
            self.hooks.append(self.balance)
        if accelerator.is_main_process:
            for line in self.describe():
                print(f"student-aware: {line}")

    def describe(self) -> list[str]:
        """One line per student-aware part that is on: what it does and the metrics it logs."""
        lines = []
        if self.augmenting:
            m = self.cfg.distillation.moe
            lines.append(
                f"Knowledge Augmentation: {m.augment_samples} teacher forwards per block, each token drawing "
                f"{m.augment_experts or 'E-1'} experts (sampled with p={m.augment_sampling_prob}, else top-k); "
                "logs ka_changed_share"
            )
        return lines + [hook.describe() for hook in self.hooks]

    def teacher_metrics(self) -> dict[str, float]:
        """Knowledge Augmentation's share of routing decisions (all ranks, this step) that chose other
        experts than the teacher's own top k -- about ``augment_sampling_prob`` when the draws work."""
        if not self.augmenting:
            return {}
        changed, decisions = self.signal.pop_stats()
        device = self.accelerator.device
        counts = torch.stack(
            [
                torch.as_tensor(changed, device=device).double(),
                torch.tensor(float(decisions), device=device).double(),
            ]
        )
        totals = self._reduce(counts, "sum")
        if totals[1] == 0:  # no teacher forward this step (e.g. a generated step that needs no teacher)
            return {}
        return {"ka_changed_share": float(totals[0] / totals[1])}

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return self.accelerator.reduce(tensor.to(self.accelerator.device), reduction=op)

    def schedule(self, step: int, total_steps: int) -> StepSchedule:
        return self.curriculum.at(step, total_steps)

    def before_step(
        self,
        step: int,
        micro_batches: list[Batch],
        schedule: StepSchedule,
        global_tokens: int,
        student_out: Callable[[Batch], HiddenAndHead],
        *,
        use_teacher: bool = True,
    ) -> StepExtras:
        """Every hook's part before the step (see the module docstring); none of the teacher's on a step whose
        objective does not read it (``use_teacher`` False: sequence-level KD's CE steps)."""
        if self.signal is not None:
            self.signal.at_step(step)
        inputs = StepInputs(step, micro_batches, schedule, global_tokens, student_out, use_teacher)
        extras = StepExtras()
        for hook in self.hooks:
            hook.before_step(inputs, extras)
        return extras

    def after_micro_batch(self, index: int, sums: dict[str, torch.Tensor]) -> None:
        for hook in self.hooks:
            hook.after_micro_batch(index, sums)

    def after_step(self, step_means: dict[str, float]) -> None:
        """After a taken step (finite loss and gradient)."""
        for hook in self.hooks:
            hook.after_step(step_means)

    def save(self, directory: Path) -> None:
        """Write the hooks' state into a checkpoint directory (main process; every rank holds the same); the
        balancer's file is written even when it is off (a run may turn it on when resumed)."""
        self.balance.save(directory)
        for hook in self.hooks:
            if hook is not self.balance:
                hook.save(directory)

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (a checkpoint of a run without these parts restores nothing)."""
        for hook in self.hooks:
            hook.load(directory)
