"""What a run carries from step to step: the counters that (with Accelerate's state) determine the next
step exactly, the early-stopping bookkeeping, and the per-record metrics."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch


@dataclass
class TrainerState:
    """Counters that, with the accelerate state, determine the next step exactly (saved as
    ``trainer_state.json`` in every checkpoint)."""

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
    generated_tokens: int = 0  # distillation.policy: tokens the student / teacher wrote for training
    generation_seconds: float = 0.0

    def count_generation(self, metrics: dict[str, Any]) -> None:
        """Add an on-policy / sequence-level step's generation to the run's totals."""
        self.generated_tokens += int(metrics.get("gen_tokens", 0))
        self.generation_seconds += float(metrics.get("gen_seconds", 0.0))

    def advance(self, micro_batches: int, steps_per_epoch: int, tokens: int, seconds: float) -> None:
        """Count one optimizer step (taken or skipped: either way its batches are consumed)."""
        self.step += 1
        self.micro_step += micro_batches
        self.step_in_epoch += 1
        if self.step_in_epoch >= steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.tokens_seen += tokens
        self.train_seconds += seconds

    def track_best(self, eval_loss: float, patience: int, min_delta: float) -> bool:
        """With early stopping on (``patience`` > 0): True when this evaluation is the new best (its step
        is then checkpointed and never pruned).

        An improvement is a drop of more than ``min_delta`` below the best loss so far (a NaN loss never
        improves); other evaluations count towards the patience.
        """
        if not patience:
            return False
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss - min_delta:
            self.best_step, self.best_eval_loss, self.evals_without_improvement = self.step, eval_loss, 0
            return True
        self.evals_without_improvement += 1
        return False


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


def tracker_config(cfg: Any) -> dict[str, Any]:
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


def tracker_init_kwargs(report_to: str, run_dir: Path) -> dict[str, Any]:
    """Per-tracker ``init_trackers`` arguments: a W&B run is named after the run directory and keeps its
    files there (``run_dir/wandb``, offline runs included) unless ``WANDB_DIR`` says otherwise."""
    if report_to != "wandb":
        return {}
    kwargs: dict[str, Any] = {"name": run_dir.name}
    if not os.environ.get("WANDB_DIR"):
        kwargs["dir"] = str(run_dir)
    return {"wandb": kwargs}
