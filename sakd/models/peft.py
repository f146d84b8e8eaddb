"""PEFT students (``model.peft``): LoRA / DoRA adapters on a frozen base, through the ``peft`` library.

The student is wrapped by ``peft.get_peft_model`` right after it is loaded, so everything downstream --
the forward, the fused loss (the output head is frozen: no head gradient is computed), the optimizer
(only parameters with ``requires_grad``), DDP / ZeRO, ``accelerator.save_state`` -- sees an ordinary
module whose trainable parameters are the adapters. What is specific to adapters lives here:

* the ``peft.LoraConfig`` a ``model.peft`` section describes, and the wrapping (QLoRA: the base loaded in
  4-bit by bitsandbytes and prepared with ``peft.prepare_model_for_kbit_training``);
* which parameters are the adapters' (:func:`is_adapter_parameter`; multi-stage training resets the
  trainable set to exactly these, never to the whole base);
* rebuilding the adapted student from a checkpoint's state dict and merging the adapters into the base
  (``merge_and_unload``), which is what ``final/`` and ``sakd export`` write by default;
* the adapter configuration saved with a run (``student_config/adapter/adapter_config.json``), from
  which ``sakd export`` knows that the checkpoint holds an adapted student.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from sakd.config import PeftConfig
from sakd.errors import SetupError

ADAPTER_DIR = "adapter"
"""Subdirectory of a run's ``student_config/`` holding the adapter configuration of a PEFT student."""

ADAPTER_MARKERS = (".lora_", ".modules_to_save.")
"""Name parts of the parameters ``peft`` trains: LoRA's A/B matrices (``lora_A``, ``lora_B``), DoRA's
``lora_magnitude_vector`` and the trained copies of ``modules_to_save`` (their frozen originals are
``original_module``)."""


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a ``peft`` model (adapters on a frozen base)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def lora_config(pcfg: PeftConfig) -> Any:
    """The ``peft.LoraConfig`` of a ``model.peft`` section (``method: dora`` is LoRA with ``use_dora``)."""
    from peft import LoraConfig

    targets = list(pcfg.target_modules)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=pcfg.rank,
        lora_alpha=pcfg.alpha,
        lora_dropout=pcfg.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=list(pcfg.modules_to_save) or None,
        use_dora=pcfg.method == "dora",
    )


def wrap_student(model: PreTrainedModel, pcfg: PeftConfig, *, gradient_checkpointing: bool) -> Any:
    """``model`` with trainable adapters on its frozen weights (``peft.get_peft_model``); a 4-bit base
    (QLoRA) is prepared by ``peft.prepare_model_for_kbit_training`` first (norms in fp32, input grads).

    Gradient checkpointing needs nothing more: transformers 5 checkpoints non-reentrantly, so the adapters
    of a checkpointed layer get gradients although its input (the frozen embedding's output) has none
    (tests/test_peft.py).
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if pcfg.quantize_base != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        return get_peft_model(model, lora_config(pcfg))
    except ValueError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SetupError(
            f"model.peft: {first} (check model.peft.target_modules against the student's module names)"
        ) from None


def is_adapter_parameter(name: str) -> bool:
    """Whether the parameter ``name`` of a PEFT model is one ``peft`` trains (see :data:`ADAPTER_MARKERS`)."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def reset_trainable(model: torch.nn.Module) -> None:
    """Make the trainable set what a fresh student has: every parameter, or a PEFT student's adapters only
    (a training stage starts from this before its own ``lr_multipliers`` freeze some)."""
    if not is_peft(model):
        model.requires_grad_(True)
        return
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))


def save_adapter_config(model: Any, directory: Path) -> None:
    """Write the adapter configuration of a PEFT ``model`` to ``directory/adapter``."""
    model.peft_config["default"].save_pretrained(str(Path(directory) / ADAPTER_DIR))


def load_adapter_config(directory: Path) -> Any | None:
    """The adapter configuration saved by :func:`save_adapter_config` under ``directory``, or None."""
    path = Path(directory) / ADAPTER_DIR
    if not (path / "adapter_config.json").is_file():
        return None
    from peft import PeftConfig as PeftLibConfig

    return PeftLibConfig.from_pretrained(str(path))


def rebuild(
    base: PreTrainedModel, adapter_config: Any, state: dict[str, torch.Tensor], *, adapters_only: bool
) -> Any:
    """The PEFT student with ``state`` loaded (a state dict of the PEFT model, e.g. from a checkpoint).

    ``adapters_only`` loads only the adapter tensors onto ``base`` as it is (QLoRA: the checkpoint's base
    weights are 4-bit; the merge goes into the full-precision original). Otherwise every tensor is loaded;
    a tied output head may be missing from ``state``, nothing else.
    """
    from peft import get_peft_model

    model = get_peft_model(base, copy.deepcopy(adapter_config))
    if adapters_only:
        state = {k: v for k, v in state.items() if is_adapter_parameter(k)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if is_adapter_parameter(k)]
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = bool(getattr(base.config, "tie_word_embeddings", False))
        missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise SetupError(
            f"the adapter checkpoint does not match the student (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )
    return model


def merged(model: Any) -> PreTrainedModel:
    """The base model with the adapters folded into its weights (``merge_and_unload``): an ordinary
    Hugging Face model with the base's architecture and parameter names."""
    plain = model.merge_and_unload()
    plain.tie_weights()
    return plain


def base_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """An ordinary model of ``config`` (weights to be loaded): the base to rebuild a PEFT student on."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return AutoModelForCausalLM.from_config(config)


def adapter_counts(config: PretrainedConfig, pcfg: PeftConfig) -> tuple[int, int]:
    """(parameters a PEFT student of ``config`` trains, linear layers that get an adapter), counted on the
    meta device (no memory, no initialisation)."""
    from peft import get_peft_model

    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(pcfg))
    seen: set[int] = set()
    trainable = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            trainable += p.numel()
    adapted = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    return trainable, adapted
