"""Built-in model presets, built from transformers configs (random init).

``tiny-moe`` / ``tiny-dense`` are for tests and the demo; ``huihui-moe-1.2b`` and ``smollm-135m``
reproduce the real architectures (dimensions of Huihui-MoE-1.2B-A0.6B and SmolLM-135M) for
benchmarks and memory planning without downloading weights; ``small-llama-15m`` is a student small enough
to train at a useful speed on 2 CPU cores with the real SmolLM2 tokenizer (``sakd bench quality``).
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, PretrainedConfig, Qwen3MoeConfig

# Each preset: (config class, kwargs). vocab_size is the real model's; presets used with a
# tokenizer of another size get `vocab_size` from that tokenizer (see build_preset_config).
PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "tiny-moe": (
        Qwen3MoeConfig,
        dict(
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=512,
            moe_intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            rope_theta=10000.0,
        ),
    ),
    "tiny-dense": (
        LlamaConfig,
        dict(
            vocab_size=4096,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=10000.0,
        ),
    ),
    # Huihui-MoE-1.2B-A0.6B: Qwen3-MoE, 28 layers, hidden 1024, 16 heads / 8 KV heads, head_dim 128,
    # 3 experts with 1 active, expert FFN 3072, vocab 151,936, untied head.
    "huihui-moe-1.2b": (
        Qwen3MoeConfig,
        dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            moe_intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            num_experts=3,
            num_experts_per_tok=1,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
        ),
    ),
    # SmolLM-135M: Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, FFN 1536, vocab 49,152, tied.
    "smollm-135m": (
        LlamaConfig,
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
        ),
    ),
    # A Llama student for CPU benchmarks with the SmolLM2 tokenizer: 4 layers, hidden 256, 4 heads / 2 KV
    # heads (head_dim 64), FFN 704, tied embeddings. With the 49,152-token vocabulary: 15,534,336
    # parameters, of which the embedding is 12,582,912 and the 4 layers + final norm 2,951,424.
    "small-llama-15m": (
        LlamaConfig,
        dict(
            vocab_size=49152,
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
        ),
    ),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_preset_config(
    name: str, vocab_size: int | None = None, **special_ids: int | None
) -> PretrainedConfig:
    """The transformers config of preset ``name``; ``vocab_size``/special ids come from the tokenizer."""
    cls, kwargs = PRESETS[name]
    kwargs = dict(kwargs)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    kwargs.update({k: v for k, v in special_ids.items() if v is not None})
    return cls(**kwargs)


def preset_config_for(name: str, tokenizer: Any) -> PretrainedConfig:
    """Preset ``name``'s config for ``tokenizer``: its vocabulary size and its pad / bos / eos ids."""
    return build_preset_config(
        name,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
