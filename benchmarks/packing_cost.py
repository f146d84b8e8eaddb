#!/usr/bin/env python3
"""What keeping documents apart costs: one distillation step (teacher forward + student forward/backward +
fused KD/CE + optimizer step, `Distiller.train_step`) with ``data.packing=cross_document`` against
``within_document``, on the same blocks of many short documents.

    python benchmarks/packing_cost.py [--student smollm-135m] [--teacher smollm-135m] [--seq 512]
        [--batch 2] [--steps 5] [--docs 4000] [--attn sdpa] [--device cpu|cuda] [--json OUT]

The corpus is the demo's generated one (one document per line, ~60 tokens each), so a block of ``seq``
tokens holds about ``seq / 60`` documents. The two runs alternate step by step (same blocks, same weights
at each step's start are not needed: only the time is compared), and the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _distiller(args, packing: str, corpus: Path, tok: Path, out: Path):
    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    raw = {
        "model": {
            "teacher": args.teacher,
            "student": args.student,
            "tokenizer": str(tok),
            "attn_implementation": args.attn,
        },
        "data": {"train": str(corpus), "sample_by": "line", "block_size": args.seq, "packing": packing},
        "distillation": {"loss": {"alpha": 0.5, "temperature": 2.0}},
        "training": {
            "output_dir": str(out / packing),
            "batch_size": args.batch,
            "max_steps": 10_000,
            "eval_every": 0,
            "save_every": 0,
        },
        "logging": {"progress_bar": False},
    }
    cfg, _ = load_config(raw)
    return Distiller(cfg, resume="none", overwrite=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="smollm-135m")
    p.add_argument("--teacher", default="smollm-135m")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for timing only")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from sakd.commands.demo import train_tokenizer
    from sakd.data.synthetic import write_corpus

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp / "corpus.txt", num_docs=args.docs, seed=0)
        tok = train_tokenizer(corpus, tmp / "tok", 2048)
        runs = {k: _distiller(args, k, corpus, tok, tmp) for k in ("cross_document", "within_document")}
        docs_per_block = float(
            runs["within_document"]._micro_batches()[0]["attention_mask"].max(1).values.float().mean()
        )
        times: dict[str, list[float]] = {k: [] for k in runs}
        for step in range(args.steps + 1):
            for name, d in runs.items():
                mbs = d._micro_batches()
                sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
                sync()
                t0 = time.perf_counter()
                d.train_step(mbs)
                sync()
                if step:  # the first step warms up
                    times[name].append(time.perf_counter() - t0)
        tokens = args.seq * args.batch
        rows = {
            k: {"median_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v)}
            for k, v in times.items()
        }
        ratio = rows["within_document"]["median_s"] / rows["cross_document"]["median_s"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, attn {args.attn}"
    )
    print(
        f"student {args.student}, teacher {args.teacher}, batch {args.batch} x {args.seq} tokens, "
        f"{docs_per_block:.1f} documents per block, median of {args.steps} steps"
    )
    print("| packing | step s | tokens/s |\n|---|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} |")
    print(f"within / cross step time: {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
