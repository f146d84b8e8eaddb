"""Which module generates, under each launch mode: the bare Hugging Face model inside whatever wrapper
Accelerate or DeepSpeed put around it, with whole parameters for the duration of the generation.

=====================  ====================================================================================
student under          generates with
=====================  ====================================================================================
one process / DDP      the unwrapped model (no_grad: DDP's hooks are not needed)
ZeRO-1/2               the unwrapped model (parameters are whole on every rank; only gradients and optimizer
                       states are partitioned)
ZeRO-3                 every parameter gathered once for the whole generation and the engine's per-layer
                       hooks removed meanwhile (:func:`sakd.upstream.zero3_whole_for_generation`): one
                       all-gather per rollout instead of one per layer per token. The student is the small
                       model, so a whole copy on each rank is the cheap side of that trade.
=====================  ====================================================================================

The teacher (sequence-level KD) generates as it is placed: replicated, the model itself; a ZeRO-3 teacher
engine keeps its partitions and gathers each layer per forward (it is the large model), with
``synced_gpus`` so every rank keeps stepping until all are done (each forward is a collective).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedModel

from sakd.upstream import zero3_whole_for_generation


def _bare(module: Any) -> Any:
    """Follow ``.module`` (DDP, a DeepSpeed engine, sakd's TrainableStudent) to the Hugging Face model."""
    while not isinstance(module, PreTrainedModel) and hasattr(module, "module"):
        module = module.module
    return module


@contextlib.contextmanager
def student_for_generation(prepared: Any, zero_stage: int) -> Iterator[Any]:
    """The student's Hugging Face model, whole, for the duration of a generation (see the module docstring).
    Under ZeRO-3 every rank must enter together."""
    if zero_stage == 3:
        with zero3_whole_for_generation(prepared) as engine:
            yield _bare(engine)
        return
    yield _bare(prepared)


def teacher_for_generation(teacher: Any, placement: str | None, world_size: int) -> tuple[Any, bool]:
    """The teacher's Hugging Face model and whether generation must keep ranks in step (``synced_gpus``)."""
    return _bare(teacher), placement == "zero3" and world_size > 1
