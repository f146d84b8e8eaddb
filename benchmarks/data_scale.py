#!/usr/bin/env python3
"""Data at scale: tokenizing and packing a large text corpus (one tokenizer), and tokenizing, aligning
and packing it for two tokenizers -- wall time, tokens/s, peak memory, disk -- cold (empty `datasets`
cache) and warm (the same command again: everything comes from the cache).

    python benchmarks/data_scale.py --text kjv.txt --copies 101 --student-tokenizer DIR \\
        --teacher-tokenizer DIR [--block-size 2048] [--num-proc 1 2] [--out runs/data_scale]

The corpus is ``--copies`` copies of ``--text`` (separated by a blank line), read with
``sample_by=paragraph``. Every measured row runs in a fresh process whose `datasets` cache is
``OUT/cache-<kind>-np<N>`` (removed before the cold run); peak memory is the process's maximum resident
set (``ru_maxrss``) and, with ``num_proc > 1``, the largest of its map workers'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_corpus(text: Path, copies: int, out: Path) -> Path:
    corpus = out / f"corpus-x{copies}.txt"
    if not corpus.exists():
        body = text.read_text(encoding="utf-8").rstrip("\n")
        tmp = corpus.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for _ in range(copies):
                fh.write(body + "\n\n")
        tmp.rename(corpus)
    return corpus


def worker(args: argparse.Namespace) -> dict:
    """One measured row, in this process (HF_DATASETS_CACHE was set by the parent)."""
    import datasets

    from sakd.data import load_text_dataset, pack, pack_pair
    from sakd.models import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(args.student_tokenizer)
    t0 = time.perf_counter()
    docs = load_text_dataset(str(args.corpus), sample_by="paragraph")
    t1 = time.perf_counter()
    if args.kind == "pack":
        blocks = pack(docs, tok, args.block_size, num_proc=args.num_proc)
    else:
        teacher = load_tokenizer(args.teacher_tokenizer)
        blocks = pack_pair(docs, tok, teacher, args.block_size, num_proc=args.num_proc)
    t2 = time.perf_counter()
    tokens = len(blocks) * args.block_size
    return {
        "kind": args.kind,
        "num_proc": args.num_proc,
        "documents": len(docs),
        "blocks": len(blocks),
        "student_tokens_packed": tokens,
        "teacher_tokens": int(sum(blocks.with_format("arrow")["teacher_length"].to_pylist()))
        if args.kind == "pack_pair"
        else None,
        "load_seconds": round(t1 - t0, 2),
        "pack_seconds": round(t2 - t1, 2),
        "tokens_per_s": round(tokens / max(t2 - t1, 1e-9)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--copies", type=int, default=101)
    ap.add_argument("--student-tokenizer", required=True)
    ap.add_argument("--teacher-tokenizer", required=True)
    ap.add_argument("--block-size", type=int, default=2048)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kinds", nargs="+", default=["pack", "pack_pair"])
    ap.add_argument("--out", type=Path, default=Path("runs/data_scale"))
    ap.add_argument("--worker", choices=["pack", "pack_pair"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.kind, args.num_proc = args.worker, args.num_proc[0]
        print(json.dumps(worker(args)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.text, args.copies, args.out)
    rows = []
    for kind in args.kinds:
        for num_proc in args.num_proc:
            cache = args.out / f"cache-{kind}-np{num_proc}"
            shutil.rmtree(cache, ignore_errors=True)
            for run in ("cold", "warm"):
                cmd = [
                    sys.executable, __file__, "--worker", kind, "--corpus", str(corpus), "--text", str(args.text),
                    "--student-tokenizer", args.student_tokenizer, "--teacher-tokenizer", args.teacher_tokenizer,
                    "--block-size", str(args.block_size), "--num-proc", str(num_proc),
                ]  # fmt: skip
                env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "true"}
                t0 = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                row = {
                    "run": run,
                    **json.loads(out.strip().splitlines()[-1]),
                    "wall_seconds": round(time.perf_counter() - t0, 1),
                    "cache_mb": round(_du(cache) / 2**20),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"corpus": str(corpus), "corpus_mb": round(corpus.stat().st_size / 2**20), "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\ncorpus: {corpus} ({result['corpus_mb']} MB)\n")
    print("| step | num_proc | run | documents | student tokens | load s | tokenize+pack s | tokens/s | peak RSS MB (main / worker) | cache MB |")  # fmt: skip
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['num_proc']} | {r['run']} | {r['documents']:,} | {r['student_tokens_packed']:,} | "
            f"{r['load_seconds']} | {r['pack_seconds']} | {r['tokens_per_s']:,} | "
            f"{r['peak_rss_mb']:,} / {r['peak_worker_rss_mb']:,} | {r['cache_mb']:,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
