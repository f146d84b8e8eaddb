"""Export: a student as a plain Hugging Face directory (config.json, model.safetensors, tokenizer
files, generation_config.json) that `AutoModelForCausalLM.from_pretrained` loads.

A PEFT student (``model.peft``) is exported with its adapters merged into the base (the same
architecture and parameter names as the base, nothing of ``peft`` needed to load it); ``adapter=True``
writes the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``, what
``peft.PeftModel.from_pretrained(base, DIR)`` loads).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from sakd.config import ConfigError, RunConfig, load_config
from sakd.errors import ExportError
from sakd.models import load_model
from sakd.models.peft import (
    base_from_config,
    is_peft,
    load_adapter_config,
    merged,
    rebuild,
    save_adapter_config,
)
from sakd.models.student import student_state
from sakd.training import checkpoint
from sakd.training.ema import EMA_FILE

log = logging.getLogger(__name__)


def save_model_dir(
    model: PreTrainedModel,
    tokenizer,
    out_dir: Path,
    *,
    weights: bool = True,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``out_dir`` atomically: everything goes to ``out_dir.tmp`` first, then is renamed."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if weights:  # a PEFT model saves its adapter alone
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    else:
        model.config.save_pretrained(tmp)
        if is_peft(model):  # what export needs to rebuild the adapted student from a checkpoint
            save_adapter_config(model, tmp)
    gen = model.generation_config if model.can_generate() and model.generation_config is not None else None
    if gen is None:
        gen = GenerationConfig.from_model_config(model.config)
    gen.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


DEEPSPEED_TAG = "pytorch_model"  # the tag accelerate's save_state gives DeepSpeed's engine checkpoint


def deepspeed_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed engine checkpoint of any ZeRO stage, on the CPU, one process.

    ZeRO-1/2/3 keep the fp32 master weights in the per-rank optimizer shards; DeepSpeed's own
    ``zero_to_fp32`` merges them. Without ZeRO (stage 0) the model states file holds the whole module.
    These files are DeepSpeed's pickles: load only checkpoints your own runs wrote.
    """
    tag_dir = ckpt / DEEPSPEED_TAG
    try:
        if any(tag_dir.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_TAG))
        states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not states:
            raise ExportError(f"{tag_dir} holds no DeepSpeed model states")
        return {
            k: v.float()
            for k, v in torch.load(states[0], map_location="cpu", weights_only=False)["module"].items()
        }
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise ExportError(
            f"cannot read the DeepSpeed checkpoint {tag_dir}: {str(e).splitlines()[0]}"
        ) from None


def _run_config(run_dir: Path) -> RunConfig | None:
    """The run's saved config, or None when it cannot be read."""
    try:
        cfg, _ = load_config(run_dir / "config.yaml")
    except (OSError, ConfigError):
        return None
    return cfg


def peft_student(config: Any, adapter_config: Any, state: dict, cfg: RunConfig | None, tokenizer: Any) -> Any:
    """A PEFT student rebuilt from a checkpoint's state dict. Its base comes from the checkpoint too, except
    under QLoRA: the checkpoint's base is 4-bit, so the adapters go onto the original full-precision
    student (``model.student``, loaded again) -- the usual QLoRA merge."""
    qlora = cfg is not None and cfg.model.peft.quantize_base != "none"
    if qlora:
        m = cfg.model
        base = load_model(
            m.student,
            tokenizer=tokenizer,
            dtype=m.student_dtype,
            trust_remote_code=m.trust_remote_code,
            seed=cfg.training.seed,
        )
    else:
        base = base_from_config(config)
    return rebuild(base, adapter_config, state, adapters_only=qlora)


def student_to_save(
    model: Any, state_dict: dict[str, torch.Tensor] | None, cfg: RunConfig, tokenizer: Any
) -> tuple[PreTrainedModel, dict[str, torch.Tensor] | None]:
    """What ``final/`` holds: ``model`` with ``state_dict``, or for a PEFT student a copy rebuilt from the
    state dict with its adapters merged (the live training model keeps its adapters)."""
    if not is_peft(model):
        return model, state_dict
    state = state_dict if state_dict is not None else model.state_dict()
    return merged(peft_student(model.config, model.peft_config["default"], state, cfg, tokenizer)), None


def export_run(
    run_dir: str | Path,
    output: str | Path,
    *,
    step: int | None = None,
    raw: bool = False,
    adapter: bool = False,
) -> Path:
    """Export the student of ``run_dir`` (newest complete checkpoint, or ``step``) to ``output``.

    The checkpoint's EMA weights are exported when the run has training.ema and training.export_ema
    (as ``final/`` holds them); ``raw`` exports the trained weights instead. A PEFT student is exported
    merged, or with ``adapter`` as its adapter alone.
    """
    run_dir = Path(run_dir)
    spec_dir = run_dir / "student_config"
    if not (spec_dir / "config.json").is_file():
        raise ExportError(f"{run_dir} is not a sakd run directory (no student_config/config.json)")
    ckpts = run_dir / "checkpoints"
    if step is not None:
        ckpt = ckpts / checkpoint.checkpoint_name(step)
        if not (ckpt / checkpoint.STATE_FILE).is_file():
            raise ExportError(f"no complete checkpoint for step {step} in {ckpts}")
    else:
        ckpt = checkpoint.latest(ckpts)
        if ckpt is None:
            raise ExportError(f"{run_dir} has no complete checkpoint to export")
    cfg = _run_config(run_dir)
    adapter_config = load_adapter_config(spec_dir)
    if adapter and adapter_config is None:
        raise ExportError(
            f"{run_dir} trained no adapters (model.peft.method=none): export it without --adapter"
        )
    weights, state = _checkpoint_weights(
        ckpt, use_ema=not raw and cfg is not None and cfg.training.ema and cfg.training.export_ema
    )
    state = student_state(state)  # the trainer checkpoints the student with its projections: drop those
    config = AutoConfig.from_pretrained(spec_dir)
    tokenizer = AutoTokenizer.from_pretrained(spec_dir)
    if adapter_config is not None:
        try:
            model = peft_student(config, adapter_config, state, cfg, tokenizer)
        except ValueError as e:  # SetupError included: the checkpoint does not fit the adapter config
            raise ExportError(f"{weights}: {str(e).splitlines()[0]}") from None
        if adapter:
            return save_model_dir(model, tokenizer, Path(output))
        return save_model_dir(merged(model), tokenizer, Path(output))
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ExportError(
            f"{weights} does not match the student config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return save_model_dir(model, tokenizer, Path(output))


def _checkpoint_weights(ckpt: Path, *, use_ema: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """The weights file of a checkpoint (its EMA with ``use_ema``, when there) and its state dict."""
    weights = ckpt / "model.safetensors"
    if use_ema:
        if (ckpt / EMA_FILE).is_file():
            weights = ckpt / EMA_FILE
        else:
            log.warning("%s has no %s: exporting the raw weights", ckpt, EMA_FILE)
    if weights.is_file():
        try:
            return weights, load_file(str(weights))
        except Exception as e:
            raise ExportError(f"cannot read {weights}: {str(e).splitlines()[0]}") from None
    if (ckpt / DEEPSPEED_TAG).is_dir():
        return ckpt / DEEPSPEED_TAG, deepspeed_state(ckpt)
    raise ExportError(f"{ckpt} has neither model.safetensors nor a DeepSpeed {DEEPSPEED_TAG}/ directory")
