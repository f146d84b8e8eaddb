"""Presets reproduce the real architectures; loading freezes teachers; trust_remote_code stays off."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sakd.config import ModelConfig
from sakd.models import ModelLoadError, build_preset_config, freeze, load_model, load_tokenizer


def _params_on_meta(name: str, vocab: int | None = None) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_preset_config(name, vocab_size=vocab))
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def test_real_architecture_presets_have_the_published_sizes():
    # Huihui-MoE-1.2B-A0.6B: 1.28 B parameters (untied head); SmolLM-135M: 134.5 M (tied embeddings).
    assert _params_on_meta("huihui-moe-1.2b") == pytest.approx(1.28e9, rel=0.01)
    assert _params_on_meta("smollm-135m") == pytest.approx(134.5e6, rel=0.01)
    c = build_preset_config("huihui-moe-1.2b")
    assert (c.num_experts, c.num_experts_per_tok, c.vocab_size, c.tie_word_embeddings) == (
        3,
        1,
        151936,
        False,
    )


def test_tiny_presets():
    moe, dense = _params_on_meta("tiny-moe", 2048), _params_on_meta("tiny-dense", 2048)
    assert 1e6 < moe < 5e6 and moe > 4 * dense
    c = build_preset_config("tiny-moe")
    assert c.num_experts >= 4 and c.num_experts_per_tok == 2


def _llama_params(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> int:
    """Closed form of a Llama with tied embeddings: embedding + per layer (q, k, v, o, gate/up/down, two
    RMSNorms) + the final norm."""
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    return vocab * hidden + layers * (attn + 3 * hidden * ffn + 2 * hidden) + hidden


def test_small_llama_student_has_its_stated_size(tokenizer_dir):
    """small-llama-15m: 15,534,336 parameters with the SmolLM2 vocabulary (49,152, tied), 2,951,424 outside
    the embedding; built through the run's model loading with a tokenizer of another size, the head follows
    the tokenizer."""
    assert _params_on_meta("small-llama-15m") == _llama_params(49152, 256, 704, 4, 4, 2) == 15_534_336
    assert _params_on_meta("small-llama-15m") - 49152 * 256 == 2_951_424
    c = build_preset_config("small-llama-15m")
    assert (c.vocab_size, c.tie_word_embeddings, c.model_type) == (49152, True, "llama")
    tok = load_tokenizer(str(tokenizer_dir))
    model = load_model("small-llama-15m", tokenizer=tok, seed=0)
    n = sum(p.numel() for p in model.parameters())  # tied: the head is the embedding, counted once
    assert n == _llama_params(len(tok), 256, 704, 4, 4, 2)


def test_teacher_is_frozen(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    teacher = freeze(load_model("tiny-moe", tokenizer=tok, seed=0))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.get_output_embeddings().weight.shape[0] == len(tok)
    again = load_model("tiny-moe", tokenizer=tok, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), again.parameters(), strict=True))


def test_local_directory_roundtrip_and_dtype(tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(tokenizer_dir))
    load_model("tiny-dense", tokenizer=tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_model(str(tmp_path / "missing"))


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False
