"""Where the frozen teacher lives: :func:`load_teacher` loads it (dtype, optional bitsandbytes 8/4-bit)
and places it -- a full copy on every process (``replicated``), or partitioned across ranks by its own
optimizer-less ZeRO-3 engine (:func:`teacher_engine`, ``zero3``; the pattern of Accelerate's multi-model
guide and TRL's ``prepare_deepspeed``)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sakd.config import ModelConfig
from sakd.config.deepspeed import zero_stage
from sakd.errors import ConfigError, SetupError
from sakd.models import freeze, load_model
from sakd.models.zero import built_whole

log = logging.getLogger(__name__)


def load_teacher(
    mcfg: ModelConfig, tokenizer: Any, accelerator: Any, ds_config: dict[str, Any] | None, *, seed: int
) -> tuple[Any, str]:
    """The frozen teacher and its placement (``replicated`` or ``zero3``, see model.teacher_placement)."""
    placement = mcfg.teacher_placement
    if placement == "auto":
        placement = "zero3" if zero_stage(ds_config) == 3 else "replicated"
    if placement == "zero3" and mcfg.teacher_quantization != "none":
        raise ConfigError(
            "model.teacher_quantization needs model.teacher_placement=replicated (a bitsandbytes-quantized "
            "teacher cannot be partitioned by ZeRO-3)"
        )
    with built_whole(accelerator):
        teacher = load_model(
            mcfg.teacher,
            tokenizer=tokenizer,
            dtype=mcfg.teacher_dtype,
            trust_remote_code=mcfg.trust_remote_code,
            seed=seed,
            attn_implementation=mcfg.attn_implementation,
            quantization=mcfg.teacher_quantization,
            device=accelerator.device,
        )
    t_rows = teacher.get_output_embeddings().weight.shape[0]
    if t_rows < len(tokenizer):
        raise SetupError(
            f"teacher has {t_rows} output rows but its tokenizer has {len(tokenizer)} tokens; "
            "set model.teacher_tokenizer to the teacher's own tokenizer"
        )
    freeze(teacher)
    if placement == "zero3":
        return teacher_engine(teacher, ds_config or {}, offload=mcfg.teacher_offload), placement
    if mcfg.teacher_quantization == "none":  # bitsandbytes already placed a quantized one
        teacher = teacher.to(accelerator.device)
    return teacher, placement


def teacher_engine(teacher: torch.nn.Module, student_ds: dict[str, Any], *, offload: bool) -> Any:
    """Partition the frozen ``teacher`` across ranks with an inference-only ZeRO-3 engine.

    The engine has no optimizer; each rank keeps 1/world of every parameter and gathers a layer's
    parameters for its forward. ``offload`` keeps the partitions in CPU memory. Batch keys are copied
    from the student's config (DeepSpeed requires them even without training).
    """
    import deepspeed

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": student_ds.get("train_micro_batch_size_per_gpu", 1),
        "gradient_accumulation_steps": student_ds.get("gradient_accumulation_steps", 1),
        "zero_optimization": {
            "stage": 3,
            # small parameters (norms, biases, the router) stay whole on every rank: no gather per use
            "stage3_param_persistence_threshold": 10 * teacher.config.hidden_size,
            "stage3_prefetch_bucket_size": 0,
        },
        "zero_allow_untested_optimizer": True,
    }
    if offload:
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    dtype = next(teacher.parameters()).dtype
    if dtype == torch.float16:
        ds["fp16"] = {"enabled": True}
    elif dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    engine.eval()
    return engine
