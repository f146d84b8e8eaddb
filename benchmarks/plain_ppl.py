#!/usr/bin/env python3
"""Held-out perplexity and bits per byte with plain `transformers` + `torch` -- no sakd code -- to check
`sakd eval` against an outside number.

    python benchmarks/plain_ppl.py MODEL_DIR TEXT_FILE [--sample-by document|paragraph|line]
                                   [--max-length 1024] [--stride 512] [--json OUT]

Documents are split from the file the way `datasets`' text loader does it (document: the whole file;
paragraph: ``text.split("\\n\\n")``; line: ``text.split("\\n")``; whitespace-only pieces dropped),
tokenized with ``add_special_tokens=False``, each followed by the tokenizer's EOS. Targets that are that
EOS are not scored (it is not text). Windows follow the Hugging Face guide "Perplexity of fixed-length
models": ``for begin in range(0, n, stride)``, ``end = min(begin + max_length, n)``, the last
``end - prev_end`` labels are targets, the model's own ``labels=`` loss -- weighted by the exact number
of targets it averaged (the guide's ``num_valid_tokens - batch_size`` under-counts every window after
the first by one). Without ``--stride`` the windows are consecutive blocks (stride = max length).

Bits per byte = NLL sum / UTF-8 bytes of the scored tokens / ln 2, each token's bytes read from its
byte-level BPE symbols (the tokenizers used here are byte-level).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def documents(text: str, sample_by: str) -> list[str]:
    pieces = {"document": [text], "paragraph": text.split("\n\n"), "line": text.split("\n")}[sample_by]
    return [p for p in pieces if p.strip()]


def token_bytes(tok, ids: list[int]) -> list[int]:
    """UTF-8 bytes of each token: the number of byte-level symbols in its string (0 for specials)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_ids)
    out = []
    for i, piece in zip(ids, tok.convert_ids_to_tokens(ids), strict=True):
        if i in special:
            out.append(0)
        else:
            assert all(c in byte_of for c in piece), f"not a byte-level token: {piece!r}"
            out.append(len(piece))
    return out


@torch.inference_mode()
def score(model, ids: torch.Tensor, scored: torch.Tensor, max_length: int, stride: int):
    n = ids.numel()
    nll, count, positions, prev_end = 0.0, 0, [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        x = ids[begin:end].unsqueeze(0)
        labels = x.clone()
        labels[:, :-trg_len] = -100
        labels[:, ~scored[begin:end]] = -100
        k = int((labels[:, 1:] != -100).sum())  # the targets the model's shifted loss averages over
        if k:
            nll += float(model(x, labels=labels).loss.double()) * k
            count += k
            positions += [begin + 1 + j for j in (labels[0, 1:] != -100).nonzero().flatten().tolist()]
        prev_end = end
        if end == n:
            break
    assert len(set(positions)) == len(positions) == count, "a token was scored twice"
    return nll, count, positions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("text_file")
    ap.add_argument("--sample-by", choices=["document", "paragraph", "line"], default="document")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=None, help="default: blocked (stride = max length)")
    ap.add_argument(
        "--score-eos",
        action="store_true",
        help="also score the EOS after each document (what sakd did before issue 17; not text)",
    )
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    with open(args.text_file, encoding="utf-8") as fh:  # universal newlines, as datasets reads it
        docs = documents(fh.read(), args.sample_by)
    ids: list[int] = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
    nbytes = token_bytes(tok, ids)
    assert sum(nbytes) == sum(len(d.encode("utf-8")) for d in docs)
    ids_t = torch.tensor(ids)
    stride = args.stride or args.max_length
    targets = torch.ones_like(ids_t, dtype=torch.bool) if args.score_eos else ids_t != tok.eos_token_id
    nll, count, positions = score(model, ids_t, targets, args.max_length, stride)
    scored_bytes = sum(nbytes[p] for p in positions)
    mean = nll / count
    out = {
        "tool": "plain transformers",
        "sample_by": args.sample_by,
        "eos_scored": args.score_eos,
        "documents": len(docs),
        "method": "blocked" if stride == args.max_length else "strided",
        "window": args.max_length,
        "stride": stride,
        "tokens": count,
        "bytes": scored_bytes,
        "loss": mean,
        "ppl": math.exp(mean),
        "bpb": nll / scored_bytes / math.log(2),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
