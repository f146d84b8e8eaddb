"""The distillation loop, on `accelerate.Accelerator`.

One optimizer step, read top to bottom in :meth:`Distiller.train_step`:

1. take this rank's ``accumulation`` micro-batches of the step (a pure function of seed/epoch/step);
2. count the valid (predicted) tokens of the whole step across micro-batches *and ranks*;
3. for each micro-batch: teacher forward (frozen, no grad) -> student forward -> the objective as a
   *sum* over tokens, scaled by ``accumulation * world / global_tokens`` (Accelerate/DeepSpeed divide
   by ``accumulation`` and DDP averages over ranks: the net gradient is that of the mean loss over
   every valid token of the step, however it is split);
4. if the step's loss (summed over ranks) and its pre-clip gradient norm are finite: clip, step the
   optimizer, step the LR schedule (defined in optimizer steps); either way, zero the grads. A skipped
   step changes no weight, optimizer or schedule state.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from sakd.align.positions import alignment_coverage
from sakd.align.setup import Alignment, setup_alignment
from sakd.config import RunConfig, dump_config
from sakd.config.deepspeed import zero_stage
from sakd.data import BatchPlan, DataBundle, prepare_data
from sakd.errors import ConfigError, DataError, SetupError, TrainingError
from sakd.evaluation.heldout import cross_tokenizer_agreement, evaluate
from sakd.models import load_model, load_tokenizer
from sakd.models.forward import hidden_and_head
from sakd.models.loading import check_model_source, default_tokenizer_spec
from sakd.models.student import TrainableStudent, student_state
from sakd.models.zero import built_whole, register_external_parameters
from sakd.objective.composite import Objective
from sakd.objective.projections import build_aux
from sakd.objective.schedules import temperature_at
from sakd.teacher.placement import load_teacher
from sakd.training import checkpoint, rundir
from sakd.training.distributed import build_accelerator, check_cuda_arch
from sakd.training.ema import EMA_FILE, StudentEMA
from sakd.training.export import export_run, save_model_dir
from sakd.training.stages import check_stages, stage_ends, stage_optimizer
from sakd.training.stop_signals import StopSignals, TrainingStopped

log = logging.getLogger(__name__)


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Process memory for metrics.jsonl: CUDA allocated/reserved/peak (MiB) on GPU, resident set on CPU."""
    if device.type == "cuda":
        mib = 2**20
        return {
            "gpu_allocated_mib": torch.cuda.memory_allocated(device) / mib,
            "gpu_reserved_mib": torch.cuda.memory_reserved(device) / mib,
            "gpu_peak_mib": torch.cuda.max_memory_allocated(device) / mib,
        }
    return {"rss_mib": psutil.Process().memory_info().rss / 2**20}


def tracker_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` scalars: trackers' hyper-parameter tables (TensorBoard's
    included) take only int, float, str and bool values."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        for key, value in node.items():
            if (
                isinstance(value, dict)
                and value
                and all(isinstance(k, str) for k in value)
                and prefix.count(".") < 3
            ):
                walk(f"{prefix}{key}.", value)
            elif isinstance(value, (bool, int, float, str)):
                flat[prefix + key] = value
            else:  # None, lists, empty tables
                flat[prefix + key] = json.dumps(value)

    walk("", json.loads(json.dumps(cfg, default=vars)))
    return flat


class NonFiniteError(TrainingError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm (one line)."""


@dataclass
class TrainerState:
    """Counters that, with the accelerate state, determine the next step exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    micro_step: int = 0  # micro-batches done (always a multiple of accumulation at a checkpoint)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm (no update made)
    scaler_skipped_steps: int = 0  # fp16: steps the loss scaler skipped (overflow; the scale is lowered)
    consecutive_skips: int = 0
    best_step: int | None = None  # early stopping: the evaluated step with the lowest eval loss (kept)
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stage: int = 0  # optimization.stages: the stage the optimizer and schedule belong to
    stop_reason: str | None = None  # "early_stopping" once it fired: resuming such a run only finishes it


class Distiller:
    """Builds everything a run needs from a :class:`RunConfig` and trains it."""

    def __init__(self, cfg: RunConfig, *, resume: str = "auto", overwrite: bool = False) -> None:
        self.cfg = cfg
        tcfg = cfg.training
        self.run_dir = Path(tcfg.output_dir)
        check_cuda_arch()
        self.accelerator = build_accelerator(cfg)
        acc = self.accelerator
        self.ds_config = acc.state.deepspeed_plugin.deepspeed_config if acc.state.deepspeed_plugin else None
        self.zero_stage = zero_stage(self.ds_config)
        self._signals = StopSignals()  # set by SIGTERM/SIGINT, read between steps
        self.resumed_from = rundir.prepare(acc, self.run_dir, resume, overwrite)
        resume_from = self.resumed_from
        set_seed(tcfg.seed)

        mcfg = cfg.model
        self.use_teacher = cfg.distillation.loss.alpha > 0
        check_model_source(mcfg.student, "student")
        if self.use_teacher:
            check_model_source(mcfg.teacher, "teacher")
        tok_spec = default_tokenizer_spec(mcfg.student, mcfg.tokenizer)
        if tok_spec is None:
            raise SetupError(f"student preset '{mcfg.student}' needs model.tokenizer (a tokenizer directory)")
        self.tokenizer = load_tokenizer(tok_spec, trust_remote_code=mcfg.trust_remote_code)
        self.teacher = None
        self.teacher_placement: str | None = None  # replicated or zero3 once a teacher is loaded
        alignment = Alignment()
        if self.use_teacher:
            t_tok_spec = default_tokenizer_spec(mcfg.teacher, mcfg.teacher_tokenizer) or tok_spec
            teacher_tok = (
                self.tokenizer
                if t_tok_spec == tok_spec
                else load_tokenizer(t_tok_spec, trust_remote_code=mcfg.trust_remote_code)
            )
            alignment = setup_alignment(cfg.distillation.alignment, self.tokenizer, teacher_tok, acc)
        self.teacher_tokenizer = alignment.teacher_tokenizer
        self.tokenizers_differ = alignment.differ
        self.aligned = alignment.aligned  # teacher tokens + position alignment in every batch
        self.vocab_map, self.teacher_to_student = alignment.vocab_map, alignment.teacher_to_student
        self.alignment_stats: dict[str, Any] = alignment.stats

        with acc.main_process_first():
            self.data: DataBundle = prepare_data(
                cfg.data, self.tokenizer, tcfg.seed, self.teacher_tokenizer if self.aligned else None
            )
        if self.aligned:
            self.alignment_stats.update(alignment_coverage(self.data.train))
            acc.print(
                "alignment: {mapped}/{student_vocab} student tokens map to the teacher vocabulary "
                "({student_coverage:.1%}); {anchored:.1%} of student positions end on a shared boundary, "
                "{multi_token:.1%} are spelt by several teacher tokens".format(**self.alignment_stats)
            )

        with built_whole(acc):
            student = load_model(
                mcfg.student,
                tokenizer=self.tokenizer,
                dtype=mcfg.student_dtype,
                trust_remote_code=mcfg.trust_remote_code,
                seed=tcfg.seed,
                attn_implementation=mcfg.attn_implementation,
            )
        if mcfg.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        student.config.use_cache = False
        self.vocab_size = len(self.tokenizer)
        if student.get_output_embeddings().weight.shape[0] < self.vocab_size:
            raise SetupError(
                f"student has {student.get_output_embeddings().weight.shape[0]} output rows but the tokenizer "
                f"has {self.vocab_size} tokens; resize the student's embeddings"
            )
        if self.use_teacher:
            self.teacher, self.teacher_placement = load_teacher(
                mcfg, self.teacher_tokenizer, acc, self.ds_config, seed=tcfg.seed + 1
            )
        self.aux, self.attention_pairs = build_aux(
            cfg.distillation, student, self.teacher, self.tokenizers_differ
        )

        self.plan = BatchPlan(
            num_blocks=len(self.data.train),
            micro_batch=tcfg.batch_size,
            accumulation=tcfg.gradient_accumulation_steps,
            world_size=acc.num_processes,
            seed=tcfg.seed,
        )
        if self.plan.steps_per_epoch == 0:
            raise DataError(
                f"{len(self.data.train)} training blocks cannot fill one optimizer step of {self.plan.blocks_per_step} "
                "blocks; lower training.batch_size / gradient_accumulation_steps or add data"
            )
        # the step each stage ends at (one stage without optimization.stages)
        self.stage_ends = stage_ends(cfg.optimization, tcfg, self.plan.steps_per_epoch)
        self.total_steps = self.stage_ends[-1]
        check_stages(cfg.optimization, student, deepspeed=self.ds_config is not None, world=acc.num_processes)
        start_stage = checkpoint.read_state(resume_from).get("stage", 0) if resume_from is not None else 0
        optimizer, scheduler = self._optimizer_for(start_stage, student)
        # One module for Accelerate: the student and the projections are synced/partitioned alike.
        self.hf_student = student  # the Hugging Face model inside whatever wrapper prepare() returns
        trainable = TrainableStudent(student, self.aux).to(acc.device)
        self.student, self.optimizer, self.scheduler = acc.prepare(trainable, optimizer, scheduler)
        if self.zero_stage == 3:
            register_external_parameters(trainable, student.get_output_embeddings(), self.aux)
        self.objective = Objective(
            cfg.distillation.loss,
            vocab_size=self.vocab_size,
            teacher_vocab_size=len(self.teacher_tokenizer) if self.teacher_tokenizer is not None else None,
            vocab_map=self.vocab_map,
            teacher_to_student=self.teacher_to_student,
            distillation=cfg.distillation,
            aux=self.aux,
            attention_pairs=self.attention_pairs,
        )
        self.state = TrainerState()
        if resume_from is not None:
            self.state = TrainerState(**checkpoint.load(acc, resume_from))
            acc.print(f"resumed from {resume_from} at step {self.state.step}")
            if acc.is_main_process:
                rundir.truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        self.ema = self._build_ema(resume_from) if tcfg.ema else None
        skips = getattr(self.student, "skipped_steps", None)  # a DeepSpeed engine's (restored) count
        self._engine_skips = skips if isinstance(skips, int) else 0
        if acc.is_main_process:
            dump_config(cfg, self.run_dir / "config.yaml")
            save_model_dir(self.hf_student, self.tokenizer, self.run_dir / "student_config", weights=False)
        if cfg.logging.report_to != "none":
            acc.init_trackers(cfg.logging.project, config=tracker_config(cfg))

    # ------------------------------------------------------------------------------ stages

    def _optimizer_for(self, stage: int, student: torch.nn.Module) -> tuple[Any, Any]:
        return stage_optimizer(
            self.cfg.optimization, student, self.aux, stage, self.stage_ends, self.accelerator.print
        )

    def _enter_stage_if_due(self) -> None:
        """At a stage's first step: the next stage's optimizer and schedule replace the current ones."""
        s, acc = self.state, self.accelerator
        while s.stage + 1 < len(self.stage_ends) and s.step >= self.stage_ends[s.stage]:
            s.stage += 1
            optimizer, scheduler = self._optimizer_for(s.stage, self.hf_student)
            acc._optimizers.remove(self.optimizer)  # checkpoints hold the current stage's state only
            acc._schedulers.remove(self.scheduler)
            self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)

    def _build_ema(self, resume_from: Path | None) -> StudentEMA:
        """The EMA of the student: from the checkpoint we resume from, else from the current weights."""
        acc, tcfg = self.accelerator, self.cfg.training
        plugin = acc.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            raise ConfigError("training.ema needs whole parameters on every rank; it does not support ZeRO-3")
        ema = StudentEMA(self.hf_student, tcfg.ema_decay, tcfg.ema_warmup_steps)
        if resume_from is not None:
            if (resume_from / EMA_FILE).is_file():
                ema.load(resume_from / EMA_FILE)
            else:
                log.warning("%s has no %s: the EMA starts from the resumed weights", resume_from, EMA_FILE)
        return ema

    def _write_extra(self, directory: Path) -> None:
        if self.ema is not None:
            self.ema.save(directory)

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.cfg.logging.report_to != "none":
            self.accelerator.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"]
            )

    # ------------------------------------------------------------------------------ the step

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        s = self.state
        idx = self.plan.micro_batches(s.epoch, s.step_in_epoch, self.accelerator.process_index)
        return [{k: v.to(self.accelerator.device) for k, v in self.data.train_batch(i).items()} for i in idx]

    def _teacher_forward(self, mb: dict[str, torch.Tensor]) -> Any:
        """The frozen teacher on its own tokens (when aligned), no grad; None without a teacher."""
        if self.teacher is None:
            return None
        aux = self.aux
        ids, mask = mb["input_ids"], mb["attention_mask"]
        if self.aligned:
            ids, mask = mb["teacher_input_ids"], mb["teacher_attention_mask"]
        with torch.no_grad():
            return hidden_and_head(
                self.teacher,
                self.teacher,
                ids,
                mask,
                router=True,
                hidden_layers=[t for t, _ in aux.feature_layers] if aux is not None else [],
                attention_layers=sorted({t for _, t in self.attention_pairs}),
            )

    def _student_loss(
        self, student: TrainableStudent, mb: dict[str, torch.Tensor], teacher_out: Any, temperature: float
    ) -> Any:
        """Student forward + objective; runs as ``TrainableStudent.forward(loss_fn=...)``."""
        aux = self.aux
        student_out = hidden_and_head(
            student.module,
            student.module,
            mb["input_ids"],
            mb["attention_mask"],
            hidden_layers=[s for _, s in aux.feature_layers] if aux is not None else [],
            attention_layers=sorted({s for s, _ in self.attention_pairs}),
        )
        return self.objective(student_out, teacher_out, mb["labels"], temperature=temperature, batch=mb)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns step metrics (global means)."""
        acc = self.accelerator
        temperature = temperature_at(self.cfg.distillation.loss, self.state.step, self.total_steps)
        local_tokens = sum(int(self.objective.valid_mask(mb["labels"]).sum()) for mb in micro_batches)
        global_tokens = int(acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum").item())
        if global_tokens == 0:
            raise RuntimeError("an optimizer step has no valid target tokens")
        scale = acc.gradient_accumulation_steps * acc.num_processes / global_tokens
        sums: dict[str, torch.Tensor] = {}
        max_norm = self.cfg.optimization.max_grad_norm
        for mb in micro_batches:
            with acc.accumulate(self.student):
                teacher_out = self._teacher_forward(mb)
                # The student's forward *and* the objective run inside the wrapped module's forward, so
                # DDP/DeepSpeed see one forward, and ZeRO-3 keeps the head and projections gathered.
                out = self.student(
                    loss_fn=partial(
                        self._student_loss, mb=mb, teacher_out=teacher_out, temperature=temperature
                    )
                )
                acc.backward(out.loss_sum * scale)
                for k, v in out.component_sums.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
                if acc.sync_gradients:  # the last micro-batch: decide on the update inside its block
                    keys = sorted(sums)
                    totals = acc.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")
                    # max_norm=inf only measures (grads * 1.0); a NaN/inf norm poisons the grads we then drop
                    grad_norm = float(
                        acc.clip_grad_norm_(
                            self.student.parameters(), math.inf if max_norm is None else max_norm
                        )
                    )
                    finite = math.isfinite(totals[keys.index("loss")].item()) and math.isfinite(grad_norm)
                    scaler_skipped = False
                    if finite:
                        self.optimizer.step()
                        scaler_skipped = self._scaler_skipped()
                        if not scaler_skipped:  # an overflow step leaves the schedule and the EMA alone
                            self.scheduler.step()
                            if self.ema is not None:
                                self.ema.update(self.hf_student)
                    self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: float(v) / global_tokens for k, v in zip(keys, totals.tolist(), strict=True)}
        metrics["temperature"] = temperature
        metrics["tokens"] = global_tokens
        metrics["scaler_skipped"] = scaler_skipped
        metrics["grad_norm"] = grad_norm
        if not finite:
            ids = torch.cat([mb["sample_ids"].reshape(-1) for mb in micro_batches if "sample_ids" in mb])
            metrics["skipped_sample_ids"] = acc.gather(ids).tolist() if len(ids) else []
        return metrics

    def _scaler_skipped(self) -> bool:
        """Whether fp16 loss scaling just skipped the optimizer step (an overflow; not counted as a
        non-finite step: the scaler lowers its scale and training goes on)."""
        engine_skips = getattr(self.student, "skipped_steps", None)  # a DeepSpeed engine counts them
        if isinstance(engine_skips, int):
            skipped = engine_skips > self._engine_skips
            self._engine_skips = engine_skips
            return skipped
        return bool(self.accelerator.optimizer_step_was_skipped)

    # ------------------------------------------------------------------------------ the loop

    def evaluate(self) -> dict[str, float]:
        """Held-out loss of the student, or of its EMA with training.eval_with_ema."""
        model, unwrapped = self.student, self.hf_student
        if self.ema is not None and self.cfg.training.eval_with_ema:
            model = unwrapped = self.ema.module
        out = evaluate(
            model,
            self.data.eval,
            batch_size=self.cfg.training.eval_batch_size,
            accelerator=self.accelerator,
            unwrapped=unwrapped,
            vocab_size=self.vocab_size,
            teacher=None if self.tokenizers_differ else self.teacher,  # agreement needs one vocabulary
            chunk_size=self.cfg.distillation.loss.chunk_size,
        )
        if self.teacher is not None and self.tokenizers_differ and self.vocab_map is not None:
            cross = cross_tokenizer_agreement(
                model,
                self.teacher,
                self.data,
                self.vocab_map,
                batch_size=self.cfg.training.eval_batch_size,
                vocab_size=self.vocab_size,
                teacher_vocab_size=len(self.teacher_tokenizer),
                chunk_size=self.cfg.distillation.loss.chunk_size,
                accelerator=self.accelerator,
            )
            out["agreement"] = cross["agreement"]
            out["teacher_mass_mapped"] = cross["teacher_mass_mapped"]
        return out

    def save_checkpoint(self) -> Path:
        protect = [self.resumed_from] if self.resumed_from is not None else []
        if self.state.best_step is not None:  # early stopping exports it: never pruned
            protect.append(self.run_dir / "checkpoints" / checkpoint.checkpoint_name(self.state.best_step))
        return checkpoint.save(
            self.accelerator,
            self.run_dir / "checkpoints",
            self.state.step,
            vars(self.state),
            self.cfg.training.keep_last_n,
            protect=protect,
            write_extra=self._write_extra if self.ema is not None else None,
        )

    def _track_best(self, eval_loss: float) -> bool:
        """With early stopping on: True when this evaluation is the new best (its step is checkpointed).

        An improvement is a drop of more than ``early_stopping_min_delta`` below the best loss so far (a
        NaN loss never improves); other evaluations count towards the patience.
        """
        tcfg, s = self.cfg.training, self.state
        if not tcfg.early_stopping_patience:
            return False
        if s.best_eval_loss is None or eval_loss < s.best_eval_loss - tcfg.early_stopping_min_delta:
            s.best_step, s.best_eval_loss, s.evals_without_improvement = s.step, eval_loss, 0
            return True
        s.evals_without_improvement += 1
        return False

    def _skipped(self, sample_ids: list[int]) -> None:
        """Record a step skipped for a non-finite loss/gradient; stop after too many in a row."""
        s, limit = self.state, self.cfg.training.max_consecutive_skips
        s.skipped_steps += 1
        s.consecutive_skips += 1
        self._log({"step": s.step, "skipped_steps": s.skipped_steps, "sample_ids": sample_ids})
        log.warning("step %d skipped: non-finite loss or gradient norm (samples %s)", s.step, sample_ids)
        if s.consecutive_skips >= limit:
            raise NonFiniteError(
                f"{limit} optimizer steps in a row had a non-finite loss or gradient norm (last: step {s.step}); "
                "stopped without saving -- the newest checkpoint holds the last good weights "
                "(lower optimization.learning_rate or check the data)"
            )

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (all ranks must stop at the same step)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._signals.signum is not None
        flag = torch.tensor(self._signals.signum or 0, device=acc.device)
        return int(acc.reduce(flag, reduction="max").item()) != 0

    def _stop(self, saved_step: int | None) -> None:
        """Checkpoint (unless this step already is) and raise :class:`TrainingStopped`."""
        s = self.state
        ckpt = self.run_dir / "checkpoints" / checkpoint.checkpoint_name(s.step)
        if saved_step != s.step:
            ckpt = self.save_checkpoint()
        signum = self._signals.signum or signal.SIGTERM  # another rank's signal when ours is unset
        self._log({"step": s.step, "stopped": signal.Signals(signum).name})
        raise TrainingStopped(signum, s.step, ckpt)

    def train(self) -> dict[str, Any]:
        """Train to the end and :meth:`finish`; on SIGTERM/SIGINT, checkpoint and raise TrainingStopped."""
        with self._signals:
            return self._train()

    def _train(self) -> dict[str, Any]:
        acc, tcfg, s = self.accelerator, self.cfg.training, self.state
        saved_step = None
        bar = tqdm(
            total=self.total_steps,
            initial=s.step,
            disable=not (acc.is_main_process and self.cfg.logging.progress_bar),
            desc="distill" if self.teacher is not None else "train",
            dynamic_ncols=True,
        )
        t_window, tok_window = time.perf_counter(), 0
        while s.step < self.total_steps and s.stop_reason is None:
            self._enter_stage_if_due()
            t0 = time.perf_counter()
            metrics = self.train_step(self._micro_batches())
            s.step += 1
            s.micro_step += self.plan.accumulation
            s.step_in_epoch += 1
            if s.step_in_epoch >= self.plan.steps_per_epoch:
                s.epoch, s.step_in_epoch = s.epoch + 1, 0
            s.tokens_seen += metrics["tokens"]
            s.train_seconds += time.perf_counter() - t0
            tok_window += metrics["tokens"]
            bar.update(1)
            skipped = "skipped_sample_ids" in metrics
            s.scaler_skipped_steps += metrics.pop("scaler_skipped")
            if skipped:
                self._skipped(metrics["skipped_sample_ids"])
            else:
                s.consecutive_skips = 0
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if not skipped and (s.step % self.cfg.logging.log_every == 0 or s.step == self.total_steps):
                now = time.perf_counter()
                record = {
                    "step": s.step,
                    "epoch": s.epoch,
                    "stage": s.stage,
                    **metrics,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": tok_window / max(now - t_window, 1e-9),
                    "tokens_seen": s.tokens_seen,
                    "skipped_steps": s.skipped_steps,
                    "scaler_skipped_steps": s.scaler_skipped_steps,
                    **memory_metrics(self.accelerator.device),
                }
                t_window, tok_window = now, 0
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                self._log(record)
            best = False
            if tcfg.eval_every and s.step % tcfg.eval_every == 0 and s.step < self.total_steps:
                evaluation = self.evaluate()
                self._log({"step": s.step, **{f"eval_{k}": v for k, v in evaluation.items()}})
                best = self._track_best(evaluation["loss"])
                if (
                    tcfg.early_stopping_patience
                    and s.evals_without_improvement >= tcfg.early_stopping_patience
                ):
                    s.stop_reason = "early_stopping"  # saved with the final checkpoint
                    log.warning(
                        "early stopping at step %d: no improvement in %d evaluations (best: step %d, loss %.4f)",
                        s.step,
                        s.evals_without_improvement,
                        s.best_step,
                        s.best_eval_loss,
                    )
            if best or (tcfg.save_every and s.step % tcfg.save_every == 0 and s.step < self.total_steps):
                self.save_checkpoint()
                saved_step = s.step
            if s.stop_reason is not None:
                break
            if self._stop_requested():
                bar.close()
                self._stop(saved_step)
        bar.close()
        final_eval = self.evaluate()
        self._log({"step": s.step, **{f"eval_{k}": v for k, v in final_eval.items()}})
        if s.stop_reason is None:
            self._track_best(final_eval["loss"])  # the last step may be the best
        self.save_checkpoint()
        if self._stop_requested():  # the run is trained and saved but not finished: resuming finishes it
            self._stop(s.step)
        return self.finish(final_eval)

    def finish(self, final_eval: dict[str, float]) -> dict[str, Any]:
        """Export ``final/`` and write ``summary.json`` (last: its presence marks the run finished).

        With early stopping, ``final/`` is the best evaluated checkpoint; ``eval_*`` in the summary are
        still those of the last evaluation (the best one's loss is ``best_eval_loss``).
        """
        acc = self.accelerator
        final_dir = self.run_dir / "final"
        use_ema = self.ema is not None and self.cfg.training.export_ema
        # all ranks take part (ZeRO-3 gathers the shards); only the main process gets the tensors
        state_dict = None if use_ema else acc.get_state_dict(self.student)
        state_dict = student_state(state_dict) if state_dict is not None else None
        summary = {
            "steps": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "train_seconds": round(self.state.train_seconds, 3),
            "eval_loss": final_eval["loss"],
            "eval_ppl": final_eval["ppl"],
            "final_dir": str(final_dir),
            "final_weights": "ema" if use_ema else "raw",
            "stop_reason": self.state.stop_reason or "max_steps",
        }
        best_step = self.state.best_step if self.cfg.training.early_stopping_patience else None
        if best_step is not None:
            summary.update(best_step=best_step, best_eval_loss=self.state.best_eval_loss)
        if "agreement" in final_eval:
            summary["teacher_agreement"] = final_eval["agreement"]
        if self.alignment_stats:
            summary["alignment"] = dict(self.alignment_stats)
            if "teacher_mass_mapped" in final_eval:
                summary["alignment"]["teacher_mass_mapped"] = final_eval["teacher_mass_mapped"]
        if acc.is_main_process:
            if best_step is not None:  # the checkpoint's EMA or raw weights, as export_ema says
                export_run(self.run_dir, final_dir, step=best_step)
            else:
                model = self.ema.module if use_ema else self.hf_student
                save_model_dir(model, self.tokenizer, final_dir, state_dict=state_dict)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        acc.wait_for_everyone()
        # Trackers only: accelerator.end_training() would also destroy the process group, and with gloo a
        # rank that tears it down right after the last barrier can reset the other rank's connection while
        # that one is still reading the barrier's reply (seen in CI: "Connection reset by peer").
        for tracker in acc.trackers:
            tracker.finish()
        return summary
