"""fp16 loss scaling in ``sakd distill``'s step: Accelerate's native AMP ``GradScaler`` (one GPU or DDP; the P100
path) and DeepSpeed's own fp16 engine.

* An fp16 overflow shows as a non-finite gradient norm once ``clip_grad_norm_`` has unscaled the gradients. It
  is the scaler's to skip: its step leaves the weights alone and halves the scale. Skipping the optimizer step
  ourselves instead would leave the scaler unscaled, and the next step's ``unscale_`` raises.
* Below :data:`MIN_LOSS_SCALE` a non-finite gradient is no overflow but a bug, and the step is a non-finite skip
  (``training.max_consecutive_skips`` of them stop the run). torch's GradScaler has no floor: it would halve on
  to 0 and, below 2**-128, unscale with an infinite factor that turns the gradients to NaN without flagging them.
  DeepSpeed's ``min_scale`` and Megatron's ``min_loss_scale`` default to 1 too.
* A skipped step is told by the scale dropping: Accelerate's ``optimizer_step_was_skipped`` misses it for a
  fused optimizer, whose step the scaler always calls (the kernel skips the update itself).
"""

from __future__ import annotations

from typing import Any

MIN_LOSS_SCALE = 1.0


def overflow_for_the_scaler(accelerator: Any) -> bool:
    """After a non-finite gradient norm: True when it is an fp16 overflow the scaler's step must skip (so step
    the optimizer); False for a non-finite step (no scaler, or below the floor: the scaler's unscale is closed
    with ``update()`` so that the next step can unscale again)."""
    scaler = accelerator.scaler
    if scaler is None:
        return False
    if scaler.get_scale() >= MIN_LOSS_SCALE:
        return True
    scaler.update()
    return False


def loss_scale(accelerator: Any) -> float | None:
    """The GradScaler's scale (None without one); read before the optimizer step for :func:`step_skipped`."""
    scaler = accelerator.scaler
    return None if scaler is None else float(scaler.get_scale())


def step_skipped(
    accelerator: Any, student: Any, engine_skips: int, scale_before: float | None
) -> tuple[bool, int]:
    """Whether fp16 loss scaling just skipped the optimizer step (an overflow; not a non-finite step), and the
    DeepSpeed engine's skipped-step count to compare with next time. ``scale_before``: :func:`loss_scale` before
    the step."""
    counted = getattr(student, "skipped_steps", None)  # a DeepSpeed engine counts them
    if isinstance(counted, int):
        return counted > engine_skips, counted
    scaler = accelerator.scaler
    if scaler is not None and scale_before is not None:
        return bool(scaler.get_scale() < scale_before), engine_skips
    return bool(accelerator.optimizer_step_was_skipped), engine_skips
