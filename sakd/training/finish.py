"""The end of a run: ``final/`` (the exported student) and ``summary.json`` -- written last, its presence
marks the run finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sakd.config import TrainingConfig
from sakd.models.student import student_state
from sakd.models.zero import built_whole
from sakd.policy import continuation_summary
from sakd.training.export import export_run, save_model_dir, student_to_save
from sakd.training.state import TrainerState

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from sakd.align.setup import Alignment
    from sakd.config import RunConfig
    from sakd.training.ema import StudentEMA


def run_summary(
    state: TrainerState,
    tcfg: TrainingConfig,
    final_eval: dict[str, float],
    final_dir: Path,
    *,
    use_ema: bool,
    alignment_stats: dict[str, Any],
) -> dict[str, Any]:
    """``summary.json``: the run's length, the last evaluation, where the student is, why it stopped.

    With early stopping, ``final/`` is the best evaluated checkpoint; ``eval_*`` are still those of the
    last evaluation (the best one's loss is ``best_eval_loss``).
    """
    summary: dict[str, Any] = {
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "train_seconds": round(state.train_seconds, 3),
        "eval_loss": final_eval["loss"],
        "eval_ppl": final_eval["ppl"],
        # bits per byte: the held-out NLL per UTF-8 byte of the scored text, comparable across tokenizers
        "eval_bpb": final_eval.get("bpb"),
        "eval_tokens": final_eval.get("tokens"),
        "eval_bytes": final_eval.get("bytes"),
        "eval_method": final_eval.get("method"),
        "final_dir": str(final_dir),
        "final_weights": "ema" if use_ema else "raw",
        "stop_reason": state.stop_reason or "max_steps",
    }
    if tcfg.early_stopping_patience and state.best_step is not None:
        summary.update(best_step=state.best_step, best_eval_loss=state.best_eval_loss)
    if "agreement" in final_eval:
        summary["teacher_agreement"] = final_eval["agreement"]
    if state.generated_tokens:  # distillation.policy: the cost of writing the training text
        summary.update(
            generated_tokens=state.generated_tokens, generation_seconds=round(state.generation_seconds, 3)
        )
    summary.update(continuation_summary(final_eval))
    if alignment_stats:
        summary["alignment"] = dict(alignment_stats)
        if "teacher_mass_mapped" in final_eval:
            summary["alignment"]["teacher_mass_mapped"] = final_eval["teacher_mass_mapped"]
    return summary


def write_final(
    run_dir: Path,
    summary: dict[str, Any],
    *,
    best_step: int | None,
    model: Any,
    tokenizer: Any,
    state_dict: Any,
) -> None:
    """Main process only: ``final/`` (the best checkpoint's export with early stopping, else ``model`` with
    ``state_dict``), then ``summary.json``."""
    final_dir = Path(summary["final_dir"])
    if best_step is not None:  # the checkpoint's EMA or raw weights, as export_ema says
        export_run(run_dir, final_dir, step=best_step)
    else:
        save_model_dir(model, tokenizer, final_dir, state_dict=state_dict)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def finish_run(
    final_eval: dict[str, float],
    *,
    accelerator: Accelerator,
    cfg: RunConfig,
    state: TrainerState,
    run_dir: Path,
    student: nn.Module,
    hf_student: nn.Module,
    ema: StudentEMA | None,
    alignment: Alignment,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, Any]:
    """:meth:`sakd.training.loop.RunLoop.finish`: export ``final/`` and write ``summary.json`` (last: its presence marks the run
    finished)."""
    acc, tcfg = accelerator, cfg.training
    use_ema = ema is not None and tcfg.export_ema
    # all ranks take part (ZeRO-3 gathers the shards); only the main process gets the tensors
    state_dict = None if use_ema else acc.get_state_dict(student)
    state_dict = student_state(state_dict) if state_dict is not None else None
    summary = run_summary(
        state,
        tcfg,
        final_eval,
        run_dir / "final",
        use_ema=use_ema,
        alignment_stats=alignment.stats,
    )
    if acc.is_main_process:
        # a PEFT student is written with its adapters merged, into a copy built whole (not by zero.Init)
        with built_whole(acc):
            model, state_dict = student_to_save(
                ema.module if ema is not None and use_ema else hf_student, state_dict, cfg, tokenizer
            )
        write_final(
            run_dir,
            summary,
            best_step=summary.get("best_step"),
            model=model,
            tokenizer=tokenizer,
            state_dict=state_dict,
        )
    acc.wait_for_everyone()
    # Trackers only: accelerator.end_training() would also destroy the process group, and with gloo a
    # rank that tears it down right after the last barrier can reset the other rank's connection while
    # that one is still reading the barrier's reply (seen in CI: "Connection reset by peer").
    for tracker in acc.trackers:
        tracker.finish()
    return summary
