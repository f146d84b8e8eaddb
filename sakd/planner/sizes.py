"""The sizes the memory estimate needs, read from a transformers config and the model instantiated on the
meta device (exact parameter counts, tied embeddings and fused MoE expert tensors included; no weights)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from sakd.config import PeftConfig
from sakd.errors import ConfigError
from sakd.models.gguf import gguf_config, is_gguf
from sakd.models.peft import adapter_counts
from sakd.models.presets import build_preset_config, is_preset


@dataclass(frozen=True)
class ModelNumbers:
    """The sizes the estimate needs, read from a transformers config and its meta-device model."""

    name: str
    total_params: int
    active_params: int  # per token: the MoE experts a token does not visit are left out
    embedding_params: int  # input embedding plus an untied output head (never quantized)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn: int  # dense FFN width, or one expert's FFN width for an MoE
    experts: int  # 0 for a dense model
    experts_per_token: int
    tied: bool
    qk_norm: bool  # RMSNorm on queries and keys (Qwen3): two more saved tensors per layer
    trainable_params: int = -1  # what the optimizer holds (-1: every parameter; a PEFT student: its adapters)
    head_trainable: bool = True  # the output head gets a gradient (a PEFT student's is frozen)
    adapter_elements: int = 0  # per token and layer: the adapters' rank-r activations (r per adapted linear)

    @property
    def trained(self) -> int:
        """Parameters with gradients and optimizer states."""
        return self.total_params if self.trainable_params < 0 else self.trainable_params

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: what ZeRO-3 gathers at a time."""
        return (self.total_params - self.embedding_params) // max(1, self.layers)


def model_config(
    spec: str, vocab_size: int | None = None, *, trust_remote_code: bool = False
) -> PretrainedConfig:
    """The transformers config of a preset (vocabulary from ``vocab_size`` or the preset's own) or of a
    local directory / cached hub id (read with AutoConfig, no weights)."""
    if is_preset(spec):
        return build_preset_config(spec, vocab_size=vocab_size)
    if is_gguf(spec):
        config = gguf_config(spec)
        if vocab_size is not None:
            config.vocab_size = vocab_size
        return config
    source = str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"cannot read the model config of '{spec}': {first} (use a preset or a local model directory)"
        ) from None
    if vocab_size is not None:
        config.vocab_size = vocab_size
    return config


def numbers_from_config(
    config: PretrainedConfig, name: str, *, trust_remote_code: bool = False
) -> ModelNumbers:
    """Count parameters exactly by building the model on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    params = dict(model.named_parameters())  # shared (tied) tensors appear once
    total = sum(p.numel() for p in params.values())
    experts = int(getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or 0)
    per_token = int(getattr(config, "num_experts_per_tok", None) or 0) if experts else 0
    routed = sum(p.numel() for n, p in params.items() if re.search(r"\.experts\.", n + "."))
    active = total - routed + (routed * per_token // experts if experts else 0)
    embedding = model.get_input_embeddings().weight.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if not tied:
        embedding += model.get_output_embeddings().weight.numel()
    heads = config.num_attention_heads
    ffn = config.moe_intermediate_size if experts and hasattr(config, "moe_intermediate_size") else None
    return ModelNumbers(
        name=name,
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        ffn=ffn or config.intermediate_size,
        experts=experts,
        experts_per_token=per_token,
        tied=tied,
        qk_norm=any(n.endswith("q_norm.weight") for n in params),
    )


@functools.lru_cache(maxsize=32)
def model_numbers(
    spec: str, vocab_size: int | None = None, *, trust_remote_code: bool = False
) -> ModelNumbers:
    """:class:`ModelNumbers` of a preset name, local model directory or cached hub id (cached: building
    a 1B model on the meta device still takes a second)."""
    config = model_config(spec, vocab_size, trust_remote_code=trust_remote_code)
    return numbers_from_config(config, spec, trust_remote_code=trust_remote_code)


def with_adapters(numbers: ModelNumbers, config: PretrainedConfig, pcfg: PeftConfig) -> ModelNumbers:
    """``numbers`` of a PEFT student (``model.peft``): only the adapters train (counted exactly on the
    meta device); the output head is frozen unless ``modules_to_save`` names it; every adapted linear
    layer saves its rank-r intermediate for backward."""
    trainable, adapted = adapter_counts(config, pcfg)
    return replace(
        numbers,
        trainable_params=trainable,
        head_trainable=any("lm_head" in m for m in pcfg.modules_to_save),
        adapter_elements=pcfg.rank * adapted // max(1, numbers.layers),
    )
