"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is sakd's distillation objective.

Swap ``Trainer`` for it, pass a teacher and (optionally) a sakd ``distillation`` section; everything else
-- ``TrainingArguments``, datasets, collators, callbacks, DeepSpeed -- stays the Trainer's. What it changes:

* the loss (:meth:`DistillationTrainer.compute_loss`) is :class:`sakd.objective.composite.Objective` --
  fused chunked KD + CE, sparse teacher signals, cross-tokenizer alignment, auxiliary terms -- built by
  the same builders as ``sakd distill`` (:mod:`sakd.training.builders`, :mod:`sakd.align.setup`,
  :mod:`sakd.objective.aux_terms`); it runs inside the prepared module's forward, as in ``sakd distill``,
  so DDP and DeepSpeed wrap one forward and ZeRO-3 keeps the output head gathered for the fused loss;
* the student is wrapped with the auxiliary projections (:class:`sakd.models.student.TrainableStudent`):
  ``trainer.model`` is that wrapper, ``trainer.student`` the Hugging Face model; ``save_model`` writes the
  student alone (``from_pretrained`` loads it) plus the projections in ``sakd_aux.safetensors``;
* every step's loss is the mean over **all** valid tokens of the step, across gradient accumulation and
  ranks (:meth:`get_batch_samples` counts them), the normalisation ``sakd distill`` uses;
* ``lr_multipliers`` (regex -> multiplier, 0.0 freezes) shape the optimizer's groups in
  :meth:`create_optimizer`; the optimizer class and its arguments stay ``TrainingArguments.optim``'s;
* the teacher is frozen and placed: on the training device, or under ZeRO-3 partitioned by its own
  inference-only engine (:func:`sakd.teacher.placement.teacher_engine`, the pattern of TRL's
  ``prepare_deepspeed``). Instead of a model, ``teacher`` may be any teacher-signal object -- a callable
  ``signal(batch) -> HiddenAndHead``; or ``teacher=None`` with ``distillation.teacher_cache``: the
  offline cache's blocks, read by each batch's block ids (:mod:`sakd.integrations.teacher_signals`);
* Knowledge Augmentation draws as ``sakd distill`` does: seeded by ``TrainingArguments.seed``, the
  Trainer's global step and each batch's block ids (``sample_ids``, which the collator passes on).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from sakd.config import DistillationConfig
from sakd.integrations.data import SAMPLE_ID, DistillationData
from sakd.integrations.step_hooks import StepHooksCallback
from sakd.integrations.teacher_signals import (
    cache_signal,
    open_section,
    teacher_output,
    trainer_signal,
)
from sakd.integrations.trainer_parts import (
    AUX_FILE,  # noqa: F401  (where users and tests import it from)
    end_run,
    load_aux,
    per_token,
    place_teacher,
    save_student,
    student_as_model,
    student_loss,
    trainer_alignment,
    trainer_param_groups,
    trainer_policy,
    trainer_run,
    zero_stage,
)
from sakd.models import freeze
from sakd.models.student import TrainableStudent
from sakd.models.zero import register_external_parameters
from sakd.objective.aux_terms import build_aux_terms
from sakd.objective.composite import Objective
from sakd.teacher.capabilities import LIVE
from sakd.training.builders import build_objective
from sakd.training.student_aware import StudentAware

log = logging.getLogger(__name__)

BATCH_COLUMNS = [
    "input_ids",
    "attention_mask",
    "labels",
    "teacher_input_ids",
    "teacher_attention_mask",
    "anchor",
    "span_end",
    SAMPLE_ID,
    "position",  # within_document packing: where each document starts (its attention stays inside)
    "teacher_position",
    "target",  # conversations: which tokens carry loss (data.loss_on)
]
"""Dataset columns the collator reads (the Trainer drops the others with ``remove_unused_columns``)."""


class _Student(TrainableStudent):
    """The wrapper the Trainer prepares, with the student methods the Trainer calls on its model."""

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.module.gradient_checkpointing_enable(**kwargs)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distills ``teacher`` into ``model`` with sakd's objective.

    Args:
        model: the student (a ``PreTrainedModel``, or a ``peft`` model).
        args: ``TrainingArguments`` (``deepspeed=...`` included).
        teacher: the teacher model (frozen here), or a teacher-signal object ``signal(batch)``; None with
            ``distillation.teacher_cache``.
        distillation: sakd's ``distillation`` section (dataclass or dict, e.g.
            ``{"loss": {"alpha": 0.5, "temperature": 1.0}, "feature": {"weight": 0.5}}``); default: its defaults.
            ``teacher_cache`` (a ``sakd cache-teacher`` directory) replaces the teacher; the training rows
            must then be the cache's blocks with their ``sample_id`` (``prepare_distillation_data`` on the
            cache's documents, tokenizer and block size).
        teacher_tokenizer: the teacher's tokenizer when it differs from ``processing_class`` (then the
            batches must carry the teacher's tokens and the alignment: see
            :func:`sakd.integrations.prepare_distillation_data`).
        lr_multipliers: regex -> learning-rate multiplier on the student's parameter names (first match
            wins; 0.0 freezes), as ``optimization.lr_multipliers``.
        data: what :func:`~sakd.integrations.prepare_distillation_data` returned: the default datasets and
            collator, and the ``data`` section (else read from its collator as ``data_collator``): over
            conversations the policies and the teacher's template go as in ``sakd distill``.
        max_consecutive_skips: non-finite-gradient steps in a row that stop training (``NonFiniteError``).
        **kwargs: everything else ``Trainer`` takes (train_dataset, data_collator, processing_class, ...).
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's global token count

    def __init__(
        self,
        model: nn.Module,
        args: Any = None,
        *,
        teacher: Any = None,
        distillation: DistillationConfig | dict | None = None,
        teacher_tokenizer: Any = None,
        lr_multipliers: dict[str, float] | None = None,
        data: DistillationData | None = None,
        max_consecutive_skips: int = 5,
        **kwargs: Any,
    ) -> None:
        self.distillation, reader = open_section(distillation, teacher)
        self.lr_multipliers = dict(lr_multipliers or {})
        tokenizer = kwargs.get("processing_class")
        seed = args.seed if args is not None else 42  # TrainingArguments' default
        run = trainer_run(self.distillation, seed, data, kwargs)
        self.alignment = trainer_alignment(run, tokenizer, teacher_tokenizer)
        teacher_model = teacher if isinstance(teacher, nn.Module) else None
        if teacher_model is not None:
            freeze(teacher_model)
        with torch.random.fork_rng(devices=[]):  # the projections' init depends on the seed alone
            torch.manual_seed(seed)
            aux = build_aux_terms(self.distillation, model, teacher_model, self.alignment.differ)
        vocab = len(tokenizer) if tokenizer is not None else model.config.vocab_size
        self.aux_terms, wrapper = aux, _Student(model, aux)
        super().__init__(model=wrapper, args=args, **kwargs)
        if self.args.label_names is None:
            self.label_names = ["labels"]
        self.teacher = (
            None if teacher_model is None else place_teacher(teacher_model, zero_stage(self), self.args)
        )
        dataset, device = self.train_dataset, self.args.device
        cached = (
            None if reader is None else cache_signal(reader, self.distillation, dataset, tokenizer, device)
        )
        signal, sar = trainer_signal(run, self.teacher, teacher, cached, self.alignment, aux, device)
        self.teacher_signal = signal
        caps = LIVE if signal is None else signal.capabilities
        self.objective: Objective = build_objective(run, vocab, self.alignment, self.aux_terms, caps)
        # sakd distill's per-step hooks (curriculum, token router, Student-Aware Router); the policy's text
        aware = StudentAware(run, self.objective, self.accelerator, signal, sar, vocab)
        policy = trainer_policy(run, self.objective, self, self.teacher, self.alignment)
        self.hooks = StepHooksCallback(aware, self.objective, policy, max_consecutive_skips)
        self.add_callback(self.hooks)
        if zero_stage(self) == 3:
            # the fused loss multiplies by the head itself (see sakd.models.zero)
            register_external_parameters(wrapper, model.get_output_embeddings(), wrapper.aux)
        self._sums: dict[str, torch.Tensor] = {}
        self._tokens = 0

    @property
    def student(self) -> nn.Module:
        """The Hugging Face student inside ``trainer.model``."""
        return self.model.module

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """``TrainingArguments.optim``'s optimizer over sakd's parameter groups: ``lr_multipliers`` (0.0
        freezes), no weight decay on biases and norms, and the auxiliary projections at the base rate --
        the groups ``sakd distill`` builds."""
        if self.optimizer is not None:
            return self.optimizer
        wrapper = self.model if model is None else model
        groups = trainer_param_groups(
            wrapper, self.args.weight_decay, self.args.learning_rate, self.lr_multipliers
        )
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, wrapper)
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    # ------------------------------------------------------------------------------ the loss

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(BATCH_COLUMNS)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple:
        """The step's micro-batches -- under ``distillation.policy`` the text written from their prompts --
        and the number of valid (predicted) tokens in all of them on all ranks: the loss of each micro-batch
        is a sum divided by it, so the step's gradient is that of the mean over every valid token of the
        step, however it is split. The per-step hooks see the step's micro-batches first."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, 0
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        batches, total = self.hooks.begin_step(
            self.state.global_step,
            self.state.max_steps or 1,
            [self._prepare_inputs(b) for b in batches],
            model,
        )
        self._tokens += total
        return batches, total

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm)
        self.hooks.grad_norm(norm, self)  # non-finite: skipped
        return norm

    def _objective(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        """The objective's sums for one micro-batch, computed inside the prepared module's forward: in
        training the step's (:class:`~sakd.integrations.step_hooks.StepPlan`) with this micro-batch's part of
        the hooks' extras."""
        # outside training: the run's objective at the curriculum's temperature of the next step
        schedule = self.hooks.aware.schedule(self.state.global_step, self.state.max_steps or 1)
        objective, temperature, use_teacher = self.objective, schedule.temperature, True
        teacher_out, kwargs = None, {}
        if self.model.training:
            plan = self.hooks.plan
            objective, temperature, use_teacher = plan.objective, plan.schedule.temperature, plan.use_teacher
            index, extras = self.hooks.next_micro_batch()
            kwargs = extras.objective_kwargs(index)
            if extras.teacher_outs is not None:
                teacher_out = extras.teacher_outs[index]
        # a cache holds the training blocks only: held-out batches are scored by the CE alone
        signal = self.teacher_signal if use_teacher else None
        live = signal is not None and signal.capabilities.scores_new_text
        if teacher_out is None and signal is not None and (self.model.training or live):
            teacher_out = teacher_output(signal, inputs, self.state.global_step)
        loss_fn = partial(
            student_loss, objective, batch=inputs, teacher_out=teacher_out, temperature=temperature, **kwargs
        )
        return model(loss_fn=loss_fn)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """sakd's objective: its sum over this micro-batch's valid tokens divided by the step's global count
        (times the world size, which DDP and DeepSpeed average gradients over). Outside training (no
        global count) the micro-batch's own mean."""
        out = self._objective(model, inputs)
        if self.model.training and num_items_in_batch:
            loss = out.loss_sum * (self.accelerator.num_processes / num_items_in_batch)
            for k, v in out.component_sums.items():
                self._sums[k] = self._sums.get(k, 0.0) + v.detach().double()
            self.hooks.after_micro_batch(out.component_sums)
        else:
            loss = out.loss_sum / max(out.num_tokens, 1)
        return (loss, {}) if return_outputs else loss

    def prediction_step(
        self, model: nn.Module, inputs: dict, prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, None, None]:
        """Held-out objective per valid token (no logits: the loss never builds them)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs gain the objective's components (kd, ce, the auxiliary terms), per token over the
        steps since the last log, as ``sakd distill`` writes them to metrics.jsonl."""
        if "loss" in logs and self._sums:
            logs.update(per_token(self._sums, self._tokens, self.accelerator, self.args.device))
            logs["tokens"] = self._tokens
            logs.update(self.hooks.metrics)  # the last step's: mult_*, router_w_*, sar_*, policy_step, gen_*
            self._sums, self._tokens = {}, 0
        super().log(logs, start_time)

    def end(self) -> None:
        """``Trainer.end``, the ranks leaving the process group together (:func:`trainer_parts.end_run`)."""
        end_run(self)

    # ------------------------------------------------------------------------------ saving and loading

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The student as the Trainer saves a model (``from_pretrained`` loads it), and the projections in
        :data:`AUX_FILE`."""
        output_dir = output_dir or self.args.output_dir
        save_student(self, partial(Trainer._save, self, output_dir), output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        with student_as_model(self) as wrapper:
            super()._load_from_checkpoint(resume_from_checkpoint, None if model is None else wrapper.module)
        load_aux(resume_from_checkpoint, wrapper)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Also the per-step hooks' state: every resume passes here (under DeepSpeed the Trainer restores the
        engine's checkpoint instead of calling :meth:`_load_from_checkpoint`)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.hooks.load(checkpoint)

    def _load_best_model(self) -> None:
        with student_as_model(self) as wrapper:
            super()._load_best_model()
        if not self.is_deepspeed_enabled:  # DeepSpeed's engine checkpoint already held the projections
            load_aux(self.state.best_model_checkpoint, wrapper)
