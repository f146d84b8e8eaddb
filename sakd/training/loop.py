"""The loop around the optimizer step: progress, metrics, periodic evaluation and checkpoints, early
stopping, stop signals, non-finite bookkeeping, and the end of the run (``final/`` and ``summary.json``).

:class:`RunLoop` is the half of :class:`sakd.training.trainer.Distiller` that runs a built run; the other
half builds it and owns :meth:`~sakd.training.trainer.Distiller.train_step`.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sakd.errors import TrainingError
from sakd.evaluation.heldout import cross_tokenizer_agreement, evaluate
from sakd.losses import resolve_chunk_size
from sakd.progress import Progress
from sakd.training import checkpoint, rundir
from sakd.training.distributed import stop_if_a_peer_dies
from sakd.training.finish import finish_run
from sakd.training.state import TrainerState, memory_metrics
from sakd.training.stop_signals import StopSignals, TrainingStopped

if TYPE_CHECKING:  # what RunLoop declares of a built run
    from accelerate import Accelerator
    from torch import nn
    from torch.optim.lr_scheduler import LRScheduler
    from transformers import PreTrainedTokenizerBase

    from sakd.align.setup import Alignment
    from sakd.config import RunConfig
    from sakd.data import BatchPlan, DataBundle
    from sakd.policy import RunContinuations
    from sakd.training.ema import StudentEMA
    from sakd.training.student_aware import StudentAware

log = logging.getLogger(__name__)


class NonFiniteError(TrainingError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm (one line)."""


def restore_state(accelerator: Any, resumed_from: Path | None, run_dir: Path) -> TrainerState:
    """The step bookkeeping of the checkpoint resumed from (metrics.jsonl cut back to it), or a fresh one."""
    if resumed_from is None:
        return TrainerState()
    state = TrainerState(**checkpoint.load(accelerator, resumed_from))
    accelerator.print(f"resumed from {resumed_from} at step {state.step}")
    if accelerator.is_main_process:
        rundir.truncate_metrics(run_dir / "metrics.jsonl", state.step)
    return state


def any_rank_stopped(accelerator: Accelerator, signals: StopSignals) -> bool:
    """Whether any rank got a stop signal (all ranks must stop at the same step)."""
    if accelerator.num_processes == 1:
        return signals.signum is not None
    flag = torch.tensor(signals.signum or 0, device=accelerator.device)
    return int(accelerator.reduce(flag, reduction="max").item()) != 0


def eval_chunk_size(
    cfg: RunConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    alignment: Alignment,
    vocab_size: int,
    batch_size: int,
) -> int:
    """Rows per chunk of held-out logits: distillation.loss.chunk_size, resolved for an eval batch."""

    def sizes(model: nn.Module, vocab: int) -> tuple[int, int]:
        config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
        return vocab, int(getattr(config, "hidden_size", 0) or 0)

    s_vocab, s_hidden = sizes(student, vocab_size)
    t_vocab, t_hidden = (0, 0) if teacher is None else sizes(teacher, vocab_size)
    if alignment.teacher_tokenizer is not None and teacher is not None:
        t_vocab = len(alignment.teacher_tokenizer)
    return resolve_chunk_size(
        cfg.distillation.loss.chunk_size,
        batch_size * cfg.data.block_size,
        (s_vocab, t_vocab),
        (s_hidden, t_hidden),
    )


def heldout_metrics(
    model: nn.Module,
    unwrapped: nn.Module,
    *,
    cfg: RunConfig,
    data: DataBundle,
    alignment: Alignment,
    hf_student: nn.Module,
    teacher: nn.Module | None,
    vocab_size: int,
    accelerator: Accelerator,
) -> dict[str, float]:
    """:meth:`RunLoop.evaluate` of ``model`` (the prepared student or its EMA; ``unwrapped`` its Hugging Face
    model): held-out loss, and agreement with the teacher (one vocabulary: at every position; across
    tokenizers: at the anchors)."""
    al, batch_size = alignment, cfg.training.eval_batch_size
    chunk = eval_chunk_size(cfg, hf_student, teacher, al, vocab_size, batch_size)
    out = evaluate(
        model,
        data.heldout(),
        batch_size=batch_size,
        window=cfg.data.block_size,
        stride=cfg.data.eval_stride,
        accelerator=accelerator,
        unwrapped=unwrapped,
        vocab_size=vocab_size,
        teacher=None if al.differ else teacher,  # agreement needs one vocabulary
        chunk_size=chunk,
    )
    if teacher is not None and al.differ and al.vocab_map is not None:
        cross = cross_tokenizer_agreement(
            model,
            teacher,
            data,
            al.vocab_map,
            batch_size=batch_size,
            vocab_size=vocab_size,
            teacher_vocab_size=len(al.teacher_tokenizer),
            chunk_size=chunk,
            accelerator=accelerator,
        )
        out["agreement"] = cross["agreement"]
        out["teacher_mass_mapped"] = cross["teacher_mass_mapped"]
    return out


class RunLoop:
    """Runs a built run: :meth:`train` calls ``train_step`` until the run's last step, evaluating,
    checkpointing and logging along the way. What it reads of the run is declared here; a subclass builds it
    (:class:`~sakd.training.trainer.Distiller`) and owns the step."""

    accelerator: Accelerator
    cfg: RunConfig
    run_dir: Path
    resumed_from: Path | None
    state: TrainerState
    plan: BatchPlan
    total_steps: int
    data: DataBundle
    tokenizer: PreTrainedTokenizerBase
    alignment: Alignment
    vocab_size: int
    student: nn.Module  # the prepared module (DDP / DeepSpeed engine around TrainableStudent)
    hf_student: nn.Module  # the Hugging Face model inside it
    teacher: nn.Module | None
    scheduler: LRScheduler
    ema: StudentEMA | None
    aware: StudentAware
    continuations: RunContinuations | None
    _signals: StopSignals

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        raise NotImplementedError  # the subclass's: one optimizer step over this rank's micro-batches

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError  # the subclass's: this rank's micro-batches of the step

    def _enter_stage_if_due(self) -> None:
        raise NotImplementedError  # the subclass's: a new stage's optimizer at its first step

    def score_continuations(self) -> dict[str, float]:
        """The teacher's loss on the student's own continuations of held-out prompts (sakd/policy); the EMA's
        with training.eval_with_ema; empty when generation.eval_prompts resolves to 0."""
        if self.continuations is None:
            return {}
        use_ema = self.ema is not None and self.cfg.training.eval_with_ema
        return self.continuations(self.ema.module if use_ema else None)

    def evaluate(self) -> dict[str, float]:
        """Held-out loss of the student (or of its EMA with training.eval_with_ema), and agreement with
        the teacher (on one vocabulary at every position; across tokenizers at the anchors)."""
        model, unwrapped = self.student, self.hf_student
        if self.ema is not None and self.cfg.training.eval_with_ema:
            model = unwrapped = self.ema.module
        return heldout_metrics(
            model,
            unwrapped,
            cfg=self.cfg,
            data=self.data,
            alignment=self.alignment,
            hf_student=self.hf_student,
            teacher=self.teacher,
            vocab_size=self.vocab_size,
            accelerator=self.accelerator,
        )

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
            write_extra=self._write_checkpoint_extras,
        )

    def _write_checkpoint_extras(self, directory: Path) -> None:
        """Our own files in a checkpoint: the EMA weights, the student-aware parts' state."""
        if self.ema is not None:
            self.ema.save(directory)
        self.aware.save(directory)

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.cfg.logging.report_to != "none":
            self.accelerator.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"]
            )

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
        with self._signals, stop_if_a_peer_dies(self.run_dir / "checkpoints"):
            return self._train()

    def _evaluate_and_track(self) -> bool:
        """A periodic evaluation; True when it is the best so far (early stopping keeps that checkpoint)."""
        s, tcfg = self.state, self.cfg.training
        evaluation = self.evaluate()
        self._log({"step": s.step, **{f"eval_{k}": v for k, v in evaluation.items()}})
        best = s.track_best(evaluation["loss"], tcfg.early_stopping_patience, tcfg.early_stopping_min_delta)
        if tcfg.early_stopping_patience and s.evals_without_improvement >= tcfg.early_stopping_patience:
            s.stop_reason = "early_stopping"  # saved with the final checkpoint
            log.warning(
                "early stopping at step %d: no improvement in %d evaluations (best: step %d, loss %.4f)",
                s.step,
                s.evals_without_improvement,
                s.best_step,
                s.best_eval_loss,
            )
        return best

    def _train(self) -> dict[str, Any]:
        acc, tcfg, s = self.accelerator, self.cfg.training, self.state
        saved_step = None
        bar = Progress(
            self.total_steps,
            initial=s.step,
            enabled=acc.is_main_process and self.cfg.logging.progress_bar,
            every=self.cfg.logging.log_every,
            desc="distill" if self.teacher is not None else "train",
        )
        t_window, tok_window = time.perf_counter(), 0
        while s.step < self.total_steps and s.stop_reason is None:
            self._enter_stage_if_due()
            t0 = time.perf_counter()
            metrics = self.train_step(self._micro_batches())
            s.advance(
                metrics.pop("micro_batches"),
                self.plan.steps_per_epoch,
                metrics["tokens"],
                time.perf_counter() - t0,
            )
            tok_window += metrics["tokens"]
            skipped = "skipped_sample_ids" in metrics
            s.scaler_skipped_steps += metrics.pop("scaler_skipped")
            figures = {"loss": "skipped" if skipped else f"{metrics['loss']:.4f}"}
            if skipped:
                self._skipped(metrics["skipped_sample_ids"])
            else:
                s.consecutive_skips = 0
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
                    **memory_metrics(acc.device),
                }
                t_window, tok_window = now, 0
                figures["tok/s"] = f"{record['tokens_per_s']:.0f}"
                self._log(record)
            bar.advance(1, **figures)
            best = bool(tcfg.eval_every and s.step % tcfg.eval_every == 0 and s.step < self.total_steps)
            best = best and self._evaluate_and_track()
            if best or (tcfg.save_every and s.step % tcfg.save_every == 0 and s.step < self.total_steps):
                self.save_checkpoint()
                saved_step = s.step
            if s.stop_reason is not None:
                break
            if any_rank_stopped(self.accelerator, self._signals):
                bar.close()
                self._stop(saved_step)
        bar.close()
        final_eval = self.evaluate()
        final_eval.update(self.score_continuations())  # the teacher on what the student writes (sakd/policy)
        self._log({"step": s.step, **{f"eval_{k}": v for k, v in final_eval.items()}})
        if s.stop_reason is None:  # the last step may be the best
            s.track_best(final_eval["loss"], tcfg.early_stopping_patience, tcfg.early_stopping_min_delta)
        self.save_checkpoint()
        if any_rank_stopped(
            self.accelerator, self._signals
        ):  # the run is trained and saved but not finished: resuming finishes it
            self._stop(s.step)
        return self.finish(final_eval)

    def finish(self, final_eval: dict[str, float]) -> dict[str, Any]:
        """Export ``final/`` and write ``summary.json`` (last: its presence marks the run finished)."""
        return finish_run(
            final_eval,
            accelerator=self.accelerator,
            cfg=self.cfg,
            state=self.state,
            run_dir=self.run_dir,
            student=self.student,
            hf_student=self.hf_student,
            ema=self.ema,
            alignment=self.alignment,
            tokenizer=self.tokenizer,
        )
