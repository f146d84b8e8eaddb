"""The distillation loop, on ``accelerate.Accelerator``.

:class:`Distiller` builds a run from its config with the builders of :mod:`sakd.training.builders` and
trains it. One optimizer step, read top to bottom in :meth:`Distiller.train_step`:

1. take this rank's micro-batches of the step (a pure function of seed / epoch / step:
   :class:`sakd.data.BatchPlan`);
2. count the valid (predicted) tokens of the whole step across micro-batches *and ranks*;
3. for each micro-batch: the teacher signal (frozen, no grad) -> the student forward and the objective
   as a *sum* over tokens, scaled by ``accumulation * world / global_tokens`` (Accelerate/DeepSpeed
   divide by ``accumulation`` and DDP averages over ranks: the net gradient is that of the mean loss over
   every valid token of the step, however it is split); before the step's last backward (the one that
   synchronises gradients, and inside which DeepSpeed steps) every rank learns whether any rank had a
   non-finite loss in any micro-batch of the step, and if so the step is skipped on all of them -- one
   agreement per step, not one host sync per micro-batch;
4. if nothing was skipped and the pre-clip gradient norm is finite: clip, step the optimizer, step the
   LR schedule (defined in optimizer steps), update the EMA; either way, zero the grads.

Why the student forward *and* the loss run inside the prepared module's forward
(``self.student(loss_fn=...)``, see :class:`sakd.models.student.TrainableStudent`): DDP and DeepSpeed
then wrap exactly one forward per micro-batch, and under ZeRO-3 the fused loss multiplies by the output
head's weight (and the auxiliary projections) without calling their modules -- registered as external
parameters of the wrapper (:func:`sakd.models.zero.register_external_parameters`), they stay gathered for
that forward and their gradients go through ZeRO's reduce-scatter in backward.
"""

from __future__ import annotations

import contextlib
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from sakd.align.setup import Alignment, setup_alignment
from sakd.config import RunConfig, dump_config
from sakd.config.deepspeed import zero_stage
from sakd.models.student import TrainableStudent
from sakd.models.zero import register_external_parameters
from sakd.objective.aux_terms import build_aux_terms
from sakd.objective.compose import check_composition
from sakd.policy import Models, build_continuations, build_policy
from sakd.teacher.cache.attach import cached_teacher, open_teacher_cache
from sakd.teacher.capabilities import LIVE, Capabilities
from sakd.teacher.placement import load_teacher
from sakd.teacher.signal import stored_capabilities
from sakd.training import checkpoint, rundir
from sakd.training.builders import (
    build_batch_plan,
    build_data,
    build_ema,
    build_objective,
    build_student,
    build_teacher_signal,
    build_tokenizers,
    needs_teacher,
)
from sakd.training.distributed import build_accelerator, check_cuda_arch
from sakd.training.export import save_model_dir
from sakd.training.loop import RunLoop, restore_state
from sakd.training.loss_scaling import loss_scale, overflow_for_the_scaler, step_skipped
from sakd.training.stages import check_stages, stage_ends, stage_optimizer
from sakd.training.state import tracker_config, tracker_init_kwargs
from sakd.training.stop_signals import StopSignals
from sakd.training.student_aware import StudentAware, detached_student
from sakd.upstream import forget_prepared, release_engine

log = logging.getLogger(__name__)


def teacher_source(cfg: RunConfig, acc: Any, use_teacher: bool) -> tuple[Any, RunConfig, Capabilities]:
    """The offline cache that replaces the teacher (distillation.teacher_cache; None: a live teacher or none),
    the config with loss.sparse resolved for that cache, and what the signal can give; prints the notes of
    :func:`sakd.objective.compose.check_composition` (what the teacher signal cannot give is refused)."""
    reader, caps, notes = None, LIVE, []
    if use_teacher and cfg.distillation.teacher_cache:
        reader, cfg, notes = open_teacher_cache(cfg)  # cfg: loss.sparse resolved for the cache
        caps = stored_capabilities(reader.spec)
    for note in notes + check_composition(cfg, caps):
        acc.print(f"note: {note}")
    return reader, cfg, caps


def record_run_start(cfg: RunConfig, acc: Any, hf_student: Any, tokenizer: Any, run_dir: Path) -> None:
    """The run directory's config.yaml and student_config/ (main process), and the trackers' start."""
    if acc.is_main_process:
        dump_config(cfg, run_dir / "config.yaml")
        save_model_dir(hf_student, tokenizer, run_dir / "student_config", weights=False)
    if cfg.logging.report_to != "none":
        acc.init_trackers(
            cfg.logging.project,
            config=tracker_config(cfg),
            init_kwargs=tracker_init_kwargs(cfg.logging.report_to, run_dir),
        )


def accumulating(accelerator: Any, student: Any, last: bool) -> Any:
    """The context of one micro-batch's backward: gradients are synchronised (and DeepSpeed steps)
    only after the step's last one."""
    # decided by the step being run, not by accumulate()'s own micro-batch counter, which is only right
    # while every step has exactly gradient_accumulation_steps micro-batches and none is skipped
    accelerator.sync_gradients = last
    return contextlib.nullcontext() if last else accelerator.no_sync(student)


def all_ranks_finite(accelerator: Any, non_finite: torch.Tensor) -> bool:
    """Whether no rank counted a non-finite micro-batch loss (all ranks then take the same branch)."""
    return bool(accelerator.reduce(non_finite, reduction="sum").item() == 0)


def drop_step(accelerator: Any, student: Any, zero_stage: int, loss: torch.Tensor, scale: float) -> bool:
    """Throw away the gradients accumulated so far in this step, on every rank; True when that took a
    boundary backward through DeepSpeed (whose engine then counts a skipped step).

    Without DeepSpeed, and under ZeRO stage 0, gradients are plain ``.grad`` until the step's last
    backward all-reduces them (the earlier micro-batches ran under ``no_sync``, so no rank is waiting in
    an all-reduce): zeroing them is enough. ZeRO-1/2/3 keep their own accumulation buffers: the step ends
    with a boundary backward of a non-finite loss, and DeepSpeed's overflow path (a non-finite global
    gradient norm) clears them and skips its update -- a path its optimizer takes in every precision.
    """
    if zero_stage < 0:
        return False  # the optimizer's zero_grad at the end of the step clears them
    if zero_stage == 0:
        student.zero_grad()  # the engine's: its parameters' .grad
        return False
    accelerator.sync_gradients = True
    accelerator.backward(loss * scale * math.nan)
    return True


class Distiller(RunLoop):
    """Builds everything a run needs from a :class:`RunConfig` (here) and trains it (the loop around
    :meth:`train_step` is :class:`~sakd.training.loop.RunLoop`)."""

    def __init__(self, cfg: RunConfig, *, resume: str = "auto", overwrite: bool = False) -> None:
        self.cfg, tcfg, mcfg = cfg, cfg.training, cfg.model
        self.run_dir = Path(tcfg.output_dir)
        check_cuda_arch()
        acc = self.accelerator = build_accelerator(cfg)
        self.ds_config = acc.state.deepspeed_plugin.deepspeed_config if acc.state.deepspeed_plugin else None
        self.zero_stage = zero_stage(self.ds_config)
        self._signals = StopSignals()  # set by SIGTERM/SIGINT, read between steps
        self.resumed_from = rundir.prepare(acc, self.run_dir, resume, overwrite)
        set_seed(tcfg.seed)

        use_teacher = needs_teacher(cfg)
        reader, cfg, caps = teacher_source(cfg, acc, use_teacher)
        self.cfg = cfg
        self.tokenizer, teacher_tok = build_tokenizers(mcfg, use_teacher=use_teacher)
        self.alignment = (
            setup_alignment(
                cfg.distillation.alignment,
                self.tokenizer,
                teacher_tok,
                acc,
                own_templates=cfg.data.format == "chat",
            )
            if use_teacher
            else Alignment()
        )
        self.data = build_data(cfg, self.tokenizer, self.alignment, acc, paired=caps.live)
        student = build_student(mcfg, self.tokenizer, acc, seed=tcfg.seed)
        self.vocab_size = len(self.tokenizer)
        self.teacher, self.teacher_placement = None, None
        if use_teacher and reader is None:
            self.teacher, self.teacher_placement = load_teacher(
                mcfg, self.alignment.teacher_tokenizer, acc, self.ds_config, seed=tcfg.seed + 1
            )
        self.aux_terms = build_aux_terms(cfg.distillation, student, self.teacher, self.alignment.differ)
        cached = None
        if reader is not None:
            cached = cached_teacher(cfg, reader, self.tokenizer, self.alignment, self.data.train, acc)
        self.teacher_signal, sar = build_teacher_signal(
            cfg, self.teacher, self.alignment, self.aux_terms, acc.device, cached=cached
        )
        caps = self.teacher_signal.capabilities if self.teacher_signal is not None else caps

        self.plan = build_batch_plan(tcfg, len(self.data.train), acc.num_processes)
        self.stage_ends = stage_ends(cfg.optimization, tcfg, self.plan.steps_per_epoch)
        self.total_steps = self.stage_ends[-1]
        check_stages(cfg.optimization, student, zero=self.zero_stage, world=acc.num_processes)
        start_stage = checkpoint.read_state(self.resumed_from).get("stage", 0) if self.resumed_from else 0
        optimizer, scheduler = self._optimizer_for(start_stage, student)
        # One module for Accelerate: the student and the projections are synced/partitioned alike.
        self.hf_student = student  # the Hugging Face model inside whatever wrapper prepare() returns
        trainable = TrainableStudent(student, self.aux_terms).to(acc.device)
        self.student, self.optimizer, self.scheduler = acc.prepare(trainable, optimizer, scheduler)
        if self.zero_stage == 3:
            register_external_parameters(trainable, student.get_output_embeddings(), self.aux_terms)
        self.objective = build_objective(cfg, self.vocab_size, self.alignment, self.aux_terms, caps)
        self.aware = StudentAware(cfg, self.objective, acc, self.teacher_signal, sar, self.vocab_size)
        # distillation.policy: on-policy / sequence-level steps, their evaluation
        models = Models.of_run(self)
        self.policy = build_policy(cfg, self.objective, models, self.plan, acc)
        self.continuations = build_continuations(cfg, models, self.data.eval, acc)
        self.state = restore_state(acc, self.resumed_from, self.run_dir)
        if self.resumed_from is not None:
            self.aware.load(self.resumed_from)
        self.ema = build_ema(tcfg, self.hf_student, self.resumed_from, self.zero_stage)
        skips = getattr(self.student, "skipped_steps", None)  # a DeepSpeed engine's (restored) count
        self._engine_skips = skips if isinstance(skips, int) else 0
        record_run_start(cfg, acc, self.hf_student, self.tokenizer, self.run_dir)

    # ------------------------------------------------------------------------------ building

    def _optimizer_for(self, stage: int, student: torch.nn.Module) -> tuple[Any, Any]:
        return stage_optimizer(
            self.cfg.optimization, student, self.aux_terms, stage, self.stage_ends, self.accelerator.print
        )

    def _enter_stage_if_due(self) -> None:
        """At a stage's first step: the next stage's optimizer and schedule replace the current ones (under
        DeepSpeed, which owns its optimizer, with a new engine around the same module)."""
        s, acc = self.state, self.accelerator
        while s.stage + 1 < len(self.stage_ends) and s.step >= self.stage_ends[s.stage]:
            s.stage += 1
            optimizer, scheduler = self._optimizer_for(s.stage, self.hf_student)
            if self.ds_config is not None:
                module = release_engine(acc, self.student, self.optimizer, self.scheduler)
                self.student, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
                self._engine_skips = 0  # the new engine counts its own skipped steps
            else:
                # checkpoints hold the current stage only
                forget_prepared(acc, self.optimizer, self.scheduler)
                self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)

    # ------------------------------------------------------------------------------ the step

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        s = self.state
        idx = self.plan.micro_batches(s.epoch, s.step_in_epoch, self.accelerator.process_index)
        return [{k: v.to(self.accelerator.device) for k, v in self.data.train_batch(i).items()} for i in idx]

    def _student_loss(
        self,
        student: TrainableStudent,
        mb: dict[str, torch.Tensor],
        teacher_out: Any,
        temperature: float,
        objective: Any = None,
        **objective_kwargs: Any,
    ) -> Any:
        """Student forward + objective (the run's, or an on-policy step's); runs as
        ``TrainableStudent.forward(loss_fn=...)`` (``objective_kwargs``: the token router's KD weights and the
        curriculum's multipliers)."""
        return (objective or self.objective).student_loss(
            student.module, mb, teacher_out, temperature=temperature, **objective_kwargs
        )

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns step metrics (global means)."""
        acc = self.accelerator
        schedule = self.aware.schedule(self.state.step, self.total_steps)
        temperature = schedule.temperature
        # distillation.policy (sakd/policy): on an on-policy / sequence-level step the blocks' prompts are
        # continued by the student / the teacher and the step trains on that text, with the step's objective
        rollout = None if self.policy is None else self.policy.rollout(micro_batches, self.state.step)
        objective, use_teacher, extra = self.objective, self.teacher_signal is not None, {}
        if rollout is not None:
            micro_batches, objective, extra = rollout.micro_batches, rollout.objective, rollout.metrics
            schedule = rollout.schedule(schedule)  # on the student's samples: T = 1 (GKD)
            temperature = schedule.temperature
            use_teacher = use_teacher and rollout.teacher_needed
            self.state.count_generation(extra)
        local_tokens = torch.stack([objective.valid_mask(mb["labels"]).sum() for mb in micro_batches]).sum()
        global_tokens = int(acc.reduce(local_tokens.to(acc.device), reduction="sum").item())
        if global_tokens == 0:
            raise RuntimeError("an optimizer step has no valid target tokens")
        # the student-aware router's update, and the token weights over the whole step (cached signals)
        extras = self.aware.before_step(
            self.state.step,
            micro_batches,
            schedule,
            global_tokens,
            partial(detached_student, self.student),
            use_teacher=use_teacher,
        )
        scale = acc.gradient_accumulation_steps * acc.num_processes / global_tokens
        sums: dict[str, torch.Tensor] = {}
        finite = True
        non_finite = torch.zeros((), device=acc.device)  # micro-batches of this rank with a non-finite loss
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with accumulating(acc, self.student, last):
                teacher_out = extras.teacher_out(i, mb, self.teacher_signal) if use_teacher else None
                # the student forward and the loss run inside the wrapped module (module docstring)
                kwargs = extras.objective_kwargs(i)
                loss_fn = partial(
                    self._student_loss, mb=mb, teacher_out=teacher_out, temperature=temperature, **kwargs
                )
                out = self.student(loss_fn=partial(loss_fn, objective=objective))
                for k, v in out.component_sums.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
                self.aware.after_micro_batch(i, out.component_sums)
                non_finite = non_finite + (~torch.isfinite(out.loss_sum.detach())).any().float()
                # decided before the synchronising backward, on every rank alike; a non-finite gradient
                # of an earlier micro-batch only sits in the accumulation the dropped step discards
                if last and not all_ranks_finite(acc, non_finite):
                    finite = False
                    if drop_step(acc, self.student, self.zero_stage, out.loss_sum, scale):
                        self._scaler_skipped()  # the engine counted it as a skipped step: not an fp16 overflow
                    break
                acc.backward(out.loss_sum * scale)
        acc.sync_gradients = True  # the wrapped optimizer steps and zeroes only when this is set
        keys = sorted(sums)
        totals = acc.reduce(torch.stack([torch.as_tensor(sums[k], device=acc.device) for k in keys]), "sum")
        grad_norm, scaler_skipped = None, False
        if finite:
            max_norm = self.cfg.optimization.max_grad_norm
            # max_norm=inf only measures (grads * 1.0); a NaN/inf norm poisons the grads we then drop
            norm_cap = math.inf if max_norm is None else max_norm
            norm = acc.clip_grad_norm_(self.student.parameters(), norm_cap)
            # DeepSpeed clips inside its engine; under ZeRO-0 it does not report the norm (None)
            grad_norm = None if norm is None else float(norm)
            finite = grad_norm is None or math.isfinite(grad_norm)
            if not finite and overflow_for_the_scaler(acc):  # fp16: the scaler's step skips it
                finite, grad_norm = True, None
        if finite:
            scale = loss_scale(acc)
            self.optimizer.step()
            scaler_skipped = self._scaler_skipped(scale)
            if not scaler_skipped:  # an overflow step leaves the schedule and the EMA alone
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.hf_student)
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, Any] = {
            k: float(v) / global_tokens for k, v in zip(keys, totals.tolist(), strict=True)
        }
        if finite and not scaler_skipped:
            self.aware.after_step(metrics)
        metrics.update(extras.metrics, **self.aware.teacher_metrics())
        metrics.update(temperature=temperature, tokens=global_tokens, scaler_skipped=scaler_skipped)
        metrics.update(grad_norm=grad_norm, micro_batches=len(micro_batches), **extra)
        if not finite:
            ids = torch.cat([mb["sample_ids"].reshape(-1) for mb in micro_batches if "sample_ids" in mb])
            metrics["skipped_sample_ids"] = acc.gather(ids).tolist() if len(ids) else []
        return metrics

    def _scaler_skipped(self, scale_before: float | None = None) -> bool:
        """Whether fp16 loss scaling just skipped the optimizer step (:func:`~sakd.training.loss_scaling.step_skipped`)."""
        skipped, self._engine_skips = step_skipped(
            self.accelerator, self.student, self._engine_skips, scale_before
        )
        return skipped
