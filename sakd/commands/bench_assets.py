"""Inputs for the benchmarks that need no download: a generated corpus and tokenizers of a chosen size.

The real-size presets take their vocabulary size from a tokenizer, so benchmarking the real pair needs
tokenizers of the real sizes (49,152 for SmolLM, 151,646 for Qwen). When the real ones are not at hand (a
lent GPU machine has only this repository), :func:`sized_tokenizer` makes one: a byte-level BPE trained on
the generated corpus, padded with *unreachable* tokens up to the size (BPE only emits tokens its merges
build, so the padding changes the head's size and nothing else). The padding strings of the two sides
overlap like the real pair's vocabularies do -- the first ``shared`` of them are the same strings -- so the
vocabulary map has a realistic number of one-to-one pairs and a many-to-one part.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import PreTrainedTokenizerFast

SMOLLM_VOCAB = 49_152
QWEN_VOCAB = 151_646


def _filler(i: int) -> str:
    """A lower-case word that the generated corpus never contains ("zq" + base-26 digits)."""
    digits = ""
    while True:
        i, r = divmod(i, 26)
        digits = string.ascii_lowercase[r] + digits
        if i == 0:
            return "Ġzq" + digits


def sized_tokenizer(
    corpus: Path, out_dir: Path, size: int, *, trained: int = 1000, shared: int = 40_000
) -> Path:
    """A tokenizer directory with exactly ``size`` tokens: ``trained`` learned on ``corpus``, the rest
    unreachable padding, of which the first ``shared`` strings are the same for every size."""
    from sakd.commands.demo import train_tokenizer

    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    base = train_tokenizer(corpus, out_dir.with_name(out_dir.name + ".base"), trained)
    spec = json.loads((base / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = {t["content"] for t in spec.get("added_tokens", [])} - set(vocab)
    k = 0
    while len(vocab) + len(added) < size:
        word = _filler(k if k < shared else k + 1000 * size)  # past `shared`: strings of this size only
        k += 1
        if word not in vocab:
            vocab[word] = len(vocab)
    (base / "tokenizer.json").write_text(json.dumps(spec))
    tok = PreTrainedTokenizerFast.from_pretrained(str(base))
    if len(tok) != size:
        raise RuntimeError(f"padded tokenizer has {len(tok)} tokens, wanted {size}")
    tok.save_pretrained(str(out_dir))
    return out_dir
