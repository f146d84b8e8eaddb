"""``model.student`` / ``model.teacher`` may name a ``.gguf`` file: a tiny Llama written here with the
``gguf`` package (the tensor names and the q/k permutation of llama.cpp's converter) loads with the
original model's logits and tokenizer, distills, and exports a plain Hugging Face model."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sakd.cli import main
from sakd.models import load_model, load_tokenizer
from sakd.models.gguf import gguf_field, is_gguf
from sakd.planner.sizes import model_numbers

gguf = pytest.importorskip("gguf")

TEXTS = ["Somebody lives in the city of 42 people.", "  two  spaces\nand a newline", ""]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (transformers reverses it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    r"model\.embed_tokens\.weight": "token_embd.weight",
    r"model\.norm\.weight": "output_norm.weight",
    r"lm_head\.weight": "output.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": "blk.{}.attn_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": "blk.{}.ffn_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight": "blk.{}.attn_q.weight",
    r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight": "blk.{}.attn_k.weight",
    r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight": "blk.{}.attn_v.weight",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": "blk.{}.attn_output.weight",
    r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight": "blk.{}.ffn_gate.weight",
    r"model\.layers\.(\d+)\.mlp\.up_proj\.weight": "blk.{}.ffn_up.weight",
    r"model\.layers\.(\d+)\.mlp\.down_proj\.weight": "blk.{}.ffn_down.weight",
}


def write_llama_gguf(model, tokenizer, path: Path) -> Path:
    """A float32 GGUF file of a Llama model and its byte-level BPE tokenizer, laid out as llama.cpp's
    converter writes one (metadata keys, tensor names, permuted q/k)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("sakd tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(
        c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
    )
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")  # digits split first: the loader must put that back
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    w.add_token_list(tokens)
    special = set(tokenizer.all_special_ids)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            array = _permute(array, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _permute(array, c.num_key_value_heads)
        target = next(t.format(*m.groups()) for p, t in GGUF_NAMES.items() if (m := re.fullmatch(p, name)))
        w.add_tensor(target, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tokenizer_dir, tmp_path_factory):
    tok = load_tokenizer(str(tokenizer_dir))
    model = load_model("tiny-dense", tokenizer=tok, seed=5).eval()
    path = write_llama_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return {"path": path, "model": model, "tokenizer": tok}


def test_a_gguf_file_loads_with_the_original_logits_and_tokens(tiny_gguf):
    path, original, tok = tiny_gguf["path"], tiny_gguf["model"], tiny_gguf["tokenizer"]
    assert is_gguf(str(path)) and gguf_field(path, "tokenizer.ggml.pre") == "smollm"
    model = load_model(str(path)).eval()
    assert not hasattr(model.config, "quantization_config")
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tok("Somebody lives in the city", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
    from_gguf = load_tokenizer(str(path))
    for text in TEXTS:  # this tokenizer has no multi-digit tokens, so the digit split changes nothing
        assert from_gguf(text).input_ids == tok(text).input_ids, text
    assert from_gguf.model_max_length == original.config.max_position_embeddings
    assert model_numbers(str(path)).total_params == sum(p.numel() for p in original.parameters())


def test_distill_into_a_gguf_student_and_export(tiny_gguf, tiny_run_config, tmp_path, capsys):
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["student"] = str(tiny_gguf["path"])  # its tokenizer comes from the file too
    raw["model"]["tokenizer"] = None
    raw["training"]["max_steps"] = 2
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe)]) == 0
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    ids = tiny_gguf["tokenizer"]("Somebody lives in", return_tensors="pt").input_ids
    assert final.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    moved = any(
        not torch.equal(p, q)
        for p, q in zip(final.parameters(), tiny_gguf["model"].parameters(), strict=True)
    )
    assert moved


def test_a_missing_gguf_file_is_one_line(tiny_run_config, tmp_path, capsys):
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["student"] = str(tmp_path / "nope.gguf")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "GGUF file not found" in err and len(err.splitlines()) == 1
