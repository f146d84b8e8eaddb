"""`sakd eval MODEL_DIR --data FILE`: held-out perplexity and bits per byte of a model directory.

The text is read as ``data.sample_by`` says (a .txt file is one document unless told otherwise), every
document's tokens joined by EOS into one stream -- nothing dropped -- and scored blocked (``--block-size``
windows, each alone) or strided (``--stride``: sliding windows, every token with at least
``block-size - stride`` tokens of context). The output says which, and how many tokens and bytes
were scored.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sakd.data.text import SAMPLE_BY


def run(args: argparse.Namespace) -> int:
    from sakd.data import DataError, load_text_dataset, text_stream
    from sakd.evaluation.heldout import evaluate
    from sakd.models import load_model, load_tokenizer

    if args.stride is not None and not 1 <= args.stride <= args.block_size:
        raise DataError(f"--stride {args.stride} must be between 1 and --block-size {args.block_size}")
    tokenizer = load_tokenizer(args.model_dir)
    docs = load_text_dataset(args.data, text_field=args.text_field, sample_by=args.sample_by)
    if len(docs) == 0:
        raise DataError(f"{args.data} holds no non-empty documents")
    stream = text_stream(docs, tokenizer)
    if args.max_blocks:
        stream = stream.prefix(args.max_blocks * args.block_size)
    if len(stream) < 2:
        raise DataError(f"{args.data} has fewer than 2 tokens: nothing to score")
    model = load_model(args.model_dir, tokenizer=tokenizer)
    teacher = None
    if args.teacher:
        if load_tokenizer(args.teacher).get_vocab() != tokenizer.get_vocab():
            raise ValueError("teacher agreement needs the teacher to share the student's tokenizer")
        teacher = load_model(args.teacher, tokenizer=tokenizer).eval()
    result: dict[str, Any] = evaluate(
        model.eval(),
        stream,
        batch_size=args.batch_size,
        window=args.block_size,
        stride=args.stride,
        teacher=teacher,
        vocab_size=len(tokenizer),
    )
    result.update(data=args.data, sample_by=args.sample_by, documents=stream.documents)
    print(json.dumps(result, indent=1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "eval",
        help="held-out perplexity and bits per byte of a model directory (and agreement with a teacher)",
        description=__doc__.split("\n\n", 1)[1],
    )
    v.add_argument("model_dir", help="a Hugging Face model directory (with tokenizer files)")
    v.add_argument("--data", required=True, help="text file (.txt/.jsonl/.parquet)")
    v.add_argument(
        "--sample-by",
        choices=SAMPLE_BY,
        default="document",
        help="what one document of a .txt file is: document (the whole file; default), paragraph "
        "(blank-line separated) or line; .jsonl/.parquet records are documents",
    )
    v.add_argument("--teacher", help="teacher directory sharing the tokenizer: adds top-1 agreement")
    v.add_argument("--text-field", default="text", help="column of .jsonl/.parquet records holding the text")
    v.add_argument("--block-size", type=int, default=256, help="tokens per window (default 256)")
    v.add_argument(
        "--stride",
        type=int,
        default=None,
        help="strided scoring: advance windows this many tokens (<= block size); default: blocked",
    )
    v.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    v.add_argument(
        "--max-blocks", type=int, default=None, help="score only the first N x block-size tokens of the text"
    )
    v.set_defaults(func=run)
