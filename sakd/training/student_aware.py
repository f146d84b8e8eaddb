"""The student-aware parts of an optimizer step, in one place so the step itself stays readable:

1. :meth:`StudentAware.schedule` -- the curriculum's temperature, per-component multipliers and router
   sharpness for this step (:mod:`sakd.objective.curriculum`);
2. :meth:`StudentAware.before_step` -- before the student's micro-batches: one update of the Student-Aware
   Router (:mod:`sakd.teacher.moe_router`) on this step's blocks, then, with the token router on, the
   teacher signals of every micro-batch (kept for the step) and the per-token KD weights over the whole step
   (:mod:`sakd.objective.router`);
3. :meth:`StudentAware.after_step` -- the balancer learns the step's magnitudes.

Their state (the SAR offsets and optimizer, the router's running statistics, the balancer's magnitudes) is
written into every checkpoint by :meth:`save` and read back by :meth:`load`, so a resumed run is exact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sakd.config import RunConfig
from sakd.models.forward import HiddenAndHead, hidden_and_head
from sakd.objective.composite import IGNORE_INDEX, Objective
from sakd.objective.curriculum import Curriculum, StepSchedule
from sakd.objective.router import TokenRouter, token_signals, weight_stats
from sakd.teacher.moe import RoutedTeacher, bare_model, override_routing
from sakd.teacher.moe_router import StudentAwareRouter, router_kd_sum, router_terms

STATE_FILE = "student_aware.json"
ROUTER_FILE = "token_router.safetensors"
Batch = dict[str, torch.Tensor]


@dataclass
class StepExtras:
    """What :meth:`StudentAware.before_step` hands to the step: cached teacher signals and KD weights per
    micro-batch (None when not used) and metrics for metrics.jsonl."""

    teacher_outs: list[HiddenAndHead] | None = None
    kd_weights: list[torch.Tensor] | None = None
    multipliers: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def teacher_out(self, i: int, mb: Batch, signal: Callable[[Batch], HiddenAndHead] | None) -> Any:
        """Micro-batch ``i``'s teacher signal: the one kept for the step, else a fresh one (None: no teacher)."""
        if self.teacher_outs is not None:
            return self.teacher_outs[i]
        return None if signal is None else signal(mb)

    def objective_kwargs(self, i: int) -> dict[str, Any]:
        """What the objective of micro-batch ``i`` gets besides the tensors (nothing when all is off)."""
        kwargs: dict[str, Any] = {}
        if self.multipliers:
            kwargs["multipliers"] = self.multipliers
        if self.kd_weights is not None:
            kwargs["kd_weights"] = self.kd_weights[i]
        return kwargs


def detached_student(student: Any, mb: Batch) -> HiddenAndHead:
    """The student's hidden states and head for ``mb`` without gradients, through the prepared (DDP /
    DeepSpeed) module (under ZeRO-3 :func:`~sakd.models.forward.output_head` copies the gathered head)."""

    def forward(module: Any) -> HiddenAndHead:
        out = hidden_and_head(module.module, module.module, mb["input_ids"], mb["attention_mask"])
        bias = None if out.head_bias is None else out.head_bias.detach()
        return HiddenAndHead(out.hidden.detach(), out.head_weight.detach(), bias)

    with torch.no_grad():
        return student(loss_fn=forward)


def component_weights(cfg: RunConfig) -> dict[str, float]:
    """The configured weight of every loss component (what balancing keeps the meaning of)."""
    d = cfg.distillation
    return {
        "kd": d.loss.alpha,
        "ce": 1.0 - d.loss.alpha,
        "feature": d.feature.weight,
        "attention": d.attention.weight,
        "contrastive": d.contrastive.weight,
    }


class StudentAware:
    """Curriculum, token router and Student-Aware Router of one run (module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        objective: Objective,
        accelerator: Any,
        signal: Any,
        sar: StudentAwareRouter | None,
        vocab_size: int,
    ) -> None:
        d = cfg.distillation
        self.cfg, self.objective, self.accelerator = cfg, objective, accelerator
        self.signal, self.sar = signal, sar  # the teacher signal; the Student-Aware Router or None
        self.curriculum = Curriculum(d.loss, d.curriculum, d.router, component_weights(cfg))
        self.router = TokenRouter(d.router, vocab_size) if d.router.enabled and signal is not None else None
        self.augmenting = isinstance(signal, RoutedTeacher) and signal.augment is not None
        if accelerator.is_main_process:
            for line in self.describe():
                print(f"student-aware: {line}")

    def describe(self) -> list[str]:
        """One line per student-aware part that is on: what it does and the metrics it logs."""
        d, lines = self.cfg.distillation, []
        if self.augmenting:
            m = d.moe
            lines.append(
                f"Knowledge Augmentation: {m.augment_samples} teacher forwards per block, each token drawing "
                f"{m.augment_experts or 'E-1'} experts (sampled with p={m.augment_sampling_prob}, else top-k); "
                "logs ka_changed_share"
            )
        if self.sar is not None:
            lines.append(
                "Student-Aware Router: the teacher's routers learn from the student's gap; logs sar_*"
            )
        if self.router is not None:
            lines.append(
                "token router: KD weighted per token by gap/confidence/trend/expert; logs router_w_*"
            )
        if d.curriculum.phases:
            lines.append("loss curriculum: KD first, then structure terms, then all; logs mult_*")
        if d.curriculum.balance:
            lines.append("magnitude balancing of the loss components; logs mult_*")
        return lines

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
    ) -> StepExtras:
        """The router update and the step's token weights (see the module docstring)."""
        extras = StepExtras(multipliers=schedule.multipliers)
        if isinstance(self.signal, RoutedTeacher):
            self.signal.step = step
        students = None
        if self.sar is not None:
            students = [student_out(mb) for mb in micro_batches]
            extras.metrics.update(
                self._router_step(micro_batches, students, global_tokens, schedule.temperature)
            )
        if self.router is not None:
            students = students or [student_out(mb) for mb in micro_batches]
            extras.teacher_outs = [self.signal(mb) for mb in micro_batches]
            extras.kd_weights, stats = self._token_weights(
                micro_batches, students, extras.teacher_outs, schedule
            )
            extras.metrics.update(stats)
        if schedule.multipliers:
            extras.metrics.update({f"mult_{c}": v for c, v in sorted(schedule.multipliers.items())})
        return extras

    def after_step(self, step_means: dict[str, float]) -> None:
        """After a taken step (finite loss and gradient)."""
        self.curriculum.update(step_means)

    # ------------------------------------------------------------------------------ the parts

    def _token_weights(
        self,
        micro_batches: list[Batch],
        students: list[HiddenAndHead],
        teachers: list[HiddenAndHead],
        schedule: StepSchedule,
    ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        spec = self.objective.spec.at_temperature(schedule.temperature).kd
        signals = []
        for mb, s_out, t_out in zip(micro_batches, students, teachers, strict=True):
            rows = self.objective.kd_rows(s_out, t_out, mb["labels"][:, 1:].reshape(-1), mb)
            signals.append(token_signals(rows, spec, t_out.router, self.cfg.distillation.loss.chunk_size))
        weights = self.router.weights(signals, schedule.sharpness, self._reduce)
        stats = weight_stats(weights, signals, self._reduce)
        stats["router_sharpness"] = schedule.sharpness
        self.router.update(signals, self._reduce)
        return weights, stats

    def _router_step(
        self,
        micro_batches: list[Batch],
        students: list[HiddenAndHead],
        global_tokens: int,
        temperature: float,
    ) -> dict[str, Any]:
        """One Student-Aware Router update on the step's blocks (paper Algorithm 2, before the student step).

        The KD term is divided by the step's global count of valid tokens, the anchor by the global count of
        the teacher's real tokens, so both are per-token means however the step is split; the balance term is
        per micro-batch, weighted by its share of the teacher's tokens."""
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

    # ------------------------------------------------------------------------------ checkpoints

    def save(self, directory: Path) -> None:
        """Write this state into a checkpoint directory (main process; every rank holds the same)."""
        (directory / STATE_FILE).write_text(json.dumps({"balancer": self.curriculum.state_dict()}))
        if self.router is not None:
            save_file(
                {k: v.contiguous() for k, v in self.router.state_dict().items()}, str(directory / ROUTER_FILE)
            )
        if self.sar is not None:
            self.sar.save(directory)

    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (a checkpoint of a run without these parts restores nothing)."""
        path = directory / STATE_FILE
        if path.is_file():
            self.curriculum.load_state_dict(json.loads(path.read_text()).get("balancer", {}))
        if self.router is not None and (directory / ROUTER_FILE).is_file():
            self.router.load_state_dict(load_file(str(directory / ROUTER_FILE)))
        if self.sar is not None:
            self.sar.load(directory)
