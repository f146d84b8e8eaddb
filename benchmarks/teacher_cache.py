"""Benchmarks of the offline teacher cache (numbers in BENCHMARKS.md, "Offline teacher cache").

    python benchmarks/teacher_cache.py storage    --kjv KJV.txt --qwen-tokenizer DIR --out OUT
    python benchmarks/teacher_cache.py throughput --kjv KJV.txt --qwen-tokenizer DIR --smollm DIR --out OUT
    python benchmarks/teacher_cache.py quality    --kjv KJV.txt --smollm DIR --out OUT [--seeds 0 1 2]

Run each under the shared lock on a shared machine (``flock /work/heavy.lock python ...``): they time
things. Every run goes through the ``sakd`` command (``python -m sakd.cli``), as a user would run it.

* storage -- bytes per token of each stored mode at k = 8, 32, 64, 256 with the real Qwen vocabulary
  (151,646 tokens: 18-bit ids, as for the model's 151,936 rows), measured on the written shards
  (a ``tiny-moe`` teacher on KJV text; the sampled mode's size depends on the teacher's entropy, so the
  quality benchmark reports it for a real teacher).
* throughput -- student tokens/s of ``sakd distill`` from the cache vs online, with the real-size
  architectures (``huihui-moe-1.2b`` teacher with the Qwen tokenizer -> ``smollm-135m`` student with the
  SmolLM tokenizer, random init, fp32).
* quality -- held-out bits per character of a tiny student (``tiny-dense`` with SmolLM2's tokenizer)
  distilled from the real SmolLM2-135M-Instruct on KJV text: online KD vs top-k 8 / 64, top-k + tail,
  sampled with 12 draws (about top-k 8's storage) and 24 draws (about 50 B/token), CE only; several seeds.

KJV.txt: one chapter per line (``sakd assets kjv DIR``); SmolLM2 and the Qwen2 tokenizer: ``sakd assets smollm2|qwen-tokenizer DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's sakd, whatever is installed


THREADS = 2  # torch threads of every sakd run; set by --threads


def sakd(*args: str) -> str:
    """Run ``python -m sakd.cli ARGS`` (from this checkout); returns stdout, raises on failure."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sakd.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"sakd {' '.join(args[:2])} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def last_json(text: str) -> dict:
    return json.loads(text[text.rindex("\n{") + 1 :] if "\n{" in text else text[text.index("{") :])


def chapters(kjv: Path) -> list[str]:
    return [line for line in kjv.read_text().splitlines() if line.strip()]


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n")
    return path


def take_chars(docs: list[str], chars: int) -> list[str]:
    """The first documents whose lengths add up to at least ``chars``."""
    out, total = [], 0
    for d in docs:
        if total >= chars:
            break
        out.append(d)
        total += len(d) + 1
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- storage


def storage(args: argparse.Namespace) -> dict:
    out = args.out / "storage"
    out.mkdir(parents=True, exist_ok=True)
    train = write_text(out / "train.txt", take_chars(chapters(args.kjv), 400_000))
    recipe = {
        "model": {"teacher": "tiny-moe", "student": "tiny-dense", "tokenizer": str(args.qwen_tokenizer)},
        "data": {
            "train": str(train),
            "sample_by": "line",  # one document per line
            "block_size": 256,
            "eval_fraction": 0.02,
            "max_train_blocks": args.blocks,
        },
        "distillation": {
            "loss": {"temperature": 1.0},
            "cache": {"blocks_per_shard": args.blocks, "batch_size": 4},
        },
        "logging": {"progress_bar": False},
    }
    path = out / "recipe.json"
    path.write_text(json.dumps(recipe))
    rows = []
    cases = [(m, k) for m in ("topk", "topk_tail") for k in (8, 32, 64, 256)] + [
        ("sampled", n) for n in (8, 16, 32, 64)
    ]
    for mode, k in cases:
        cache = out / f"{mode}-{k}"
        key = "num_samples" if mode == "sampled" else "top_k"
        sakd(
            "cache-teacher",
            "--config",
            str(path),
            "--output",
            str(cache),
            f"distillation.cache.mode={mode}",
            f"distillation.cache.{key}={k}",
            "--overwrite",
        )
        m = json.loads((cache / "manifest.json").read_text())
        entries = sum(s["entries"] for s in m["shards"])
        rows.append(
            {
                "mode": mode,
                "k_or_n": k,
                "positions": m["layout"]["positions"],
                "bytes": m["totals"]["bytes"],
                "bytes_per_token": m["totals"]["bytes_per_token"],
                "ids_per_position": entries / m["layout"]["positions"],
                "index_bits": m["signal"]["index_bits"],
                "target_6k_plus_8": 6 * k + 8 if mode != "sampled" else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return {"vocab": m["signal"]["vocab_size"], "rows": rows}


# ---------------------------------------------------------------------------------------- throughput


def throughput(args: argparse.Namespace) -> dict:
    out = args.out / "throughput"
    out.mkdir(parents=True, exist_ok=True)
    docs = chapters(args.kjv)
    train = write_text(out / "train.txt", take_chars(docs, 200_000))
    evalf = write_text(out / "eval.txt", docs[-3:])
    steps = args.warmup + args.steps
    student_blocks = steps * args.batch
    recipe = {
        "model": {
            "teacher": "huihui-moe-1.2b",
            "student": "smollm-135m",
            "tokenizer": str(args.smollm),
            "teacher_tokenizer": str(args.qwen_tokenizer),
        },
        "data": {
            "train": str(train),
            "sample_by": "line",  # one document per line
            "eval": str(evalf),
            "block_size": args.block,
            "max_train_blocks": student_blocks,
            "max_eval_blocks": 1,
        },
        "distillation": {
            "loss": {"alpha": 0.5, "temperature": 1.0, "chunk_size": 256},
            "cache": {"mode": "topk_tail", "top_k": args.k, "batch_size": args.batch},
        },
        "training": {"batch_size": args.batch, "max_steps": steps, "eval_every": 0, "seed": 0},
        "logging": {"log_every": 1, "progress_bar": False},
    }
    path = out / "recipe.json"
    path.write_text(json.dumps(recipe))
    result: dict = {}
    t = time.perf_counter()
    # the teacher's text for the student's blocks (same order of tokens per character: a few blocks more)
    gen = last_json(
        sakd(
            "cache-teacher",
            "--config",
            str(path),
            "--output",
            str(out / "cache"),
            f"data.max_train_blocks={student_blocks + 2}",
            "--overwrite",
        )
    )
    result["cache"] = {**gen, "wall_seconds": round(time.perf_counter() - t, 1)}
    for name, extra in (("online", []), ("cached", [f"distillation.teacher_cache={out / 'cache'}"])):
        run = out / name
        t = time.perf_counter()
        sakd("distill", "--config", str(path), f"training.output_dir={run}", *extra, "--overwrite")
        steps_m = [m for m in metrics(run) if "tokens_per_s" in m][args.warmup :]
        tokens = sum(m["tokens"] for m in steps_m)
        seconds = sum(m["tokens"] / m["tokens_per_s"] for m in steps_m)
        result[name] = {
            "student_tokens_per_s": round(tokens / seconds, 2),
            "steps_timed": len(steps_m),
            "rss_mib_max": max(m.get("rss_mib", 0) for m in steps_m),
            "kd_positions": steps_m[-1].get("kd_positions"),
            "wall_seconds": round(time.perf_counter() - t, 1),
        }
        print(name, json.dumps(result[name]), flush=True)
    result["speedup"] = round(
        result["cached"]["student_tokens_per_s"] / result["online"]["student_tokens_per_s"], 3
    )
    return result


# ------------------------------------------------------------------------------------------- quality


def eval_chars(eval_file: Path, tokenizer: str, block: int) -> int:
    """Characters covered by the predicted tokens of the held-out blocks (token 1.. of each block)."""
    import datasets

    from sakd.models import load_tokenizer
    from sakd.teacher.cache.blocks import token_blocks

    docs = datasets.Dataset.from_dict({"text": chapters(eval_file)})
    blocks = token_blocks(docs, load_tokenizer(tokenizer), block)
    return sum(row["char_end"][-1] - row["char_end"][0] for row in blocks)


def quality(args: argparse.Namespace) -> dict:
    out = args.out / "quality"
    out.mkdir(parents=True, exist_ok=True)
    docs = chapters(args.kjv)
    train = write_text(out / "train.txt", take_chars(docs, args.train_chars))
    held = take_chars(list(reversed(docs)), args.eval_chars)[::-1]
    evalf = write_text(out / "eval.txt", held)
    base = {
        "model": {"teacher": str(args.smollm), "student": "tiny-dense", "tokenizer": str(args.smollm)},
        "data": {
            "train": str(train),
            "sample_by": "line",  # one document per line
            "eval": str(evalf),
            "block_size": args.block,
            "max_eval_blocks": 10_000,
        },
        "distillation": {
            "loss": {"alpha": 0.5, "temperature": 1.0, "chunk_size": 256},
            "cache": {"batch_size": 8, "blocks_per_shard": 64},
        },
        "optimization": {"learning_rate": args.lr, "warmup_steps": 5},
        "training": {"batch_size": args.batch, "num_epochs": args.epochs, "eval_every": 0},
        "logging": {"log_every": 10, "progress_bar": False},
    }
    recipe = out / "recipe.json"
    recipe.write_text(json.dumps(base))
    chars = eval_chars(evalf, str(args.smollm), args.block)
    result: dict = {"eval_chars": chars, "caches": {}, "runs": []}
    # the teacher's own held-out loss on the same blocks
    t = last_json(
        sakd(
            "eval",
            str(args.smollm),
            "--data",
            str(evalf),
            "--sample-by",
            "line",
            "--block-size",
            str(args.block),
            "--prompts",
            "0",
        )
    )
    result["teacher"] = {**t, "bits_per_char": t["loss"] * t["tokens"] / chars / math.log(2)}
    print("teacher", json.dumps(result["teacher"]), flush=True)
    caches = {"topk_tail64": ["distillation.cache.mode=topk_tail", "distillation.cache.top_k=64"]}
    for n in args.samples:
        caches[f"sampled{n}"] = ["distillation.cache.mode=sampled", f"distillation.cache.num_samples={n}"]
    for name, extra in caches.items():
        t0 = time.perf_counter()
        gen = last_json(
            sakd("cache-teacher", "--config", str(recipe), "--output", str(out / name), *extra, "--overwrite")
        )
        m = json.loads((out / name / "manifest.json").read_text())
        gen["ids_per_position"] = sum(s["entries"] for s in m["shards"]) / m["layout"]["positions"]
        gen["wall_seconds"] = round(time.perf_counter() - t0, 1)
        result["caches"][name] = gen
        print(name, json.dumps(gen), flush=True)
    variants = {
        "ce_only": ["distillation.loss.alpha=0"],
        "online_full_kd": [],
        "topk8": [
            f"distillation.teacher_cache={out / 'topk_tail64'}",
            "distillation.loss.sparse=subset",
            "distillation.loss.kd_top_k=8",
        ],
        "topk64": [
            f"distillation.teacher_cache={out / 'topk_tail64'}",
            "distillation.loss.sparse=subset",
            "distillation.loss.kd_top_k=64",
        ],
        "topk8_tail": [
            f"distillation.teacher_cache={out / 'topk_tail64'}",
            "distillation.loss.sparse=topk_tail",
            "distillation.loss.kd_top_k=8",
        ],
    }
    for n in args.samples:
        variants[f"sampled{n}"] = [f"distillation.teacher_cache={out / f'sampled{n}'}"]
    for seed in args.seeds:
        for name, extra in variants.items():
            run = out / f"{name}-s{seed}"
            t0 = time.perf_counter()
            summary = last_json(
                sakd(
                    "distill",
                    "--config",
                    str(recipe),
                    f"training.output_dir={run}",
                    f"training.seed={seed}",
                    *extra,
                    "--overwrite",
                )
            )
            final = [m for m in metrics(run) if "eval_loss" in m][-1]
            row = {
                "variant": name,
                "seed": seed,
                "eval_loss": summary["eval_loss"],
                "eval_tokens": final["eval_tokens"],
                "bits_per_char": summary["eval_loss"] * final["eval_tokens"] / chars / math.log(2),
                "train_seconds": summary["train_seconds"],
                "wall_seconds": round(time.perf_counter() - t0, 1),
            }
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    table = {}
    for name in variants:
        bpc = [r["bits_per_char"] for r in result["runs"] if r["variant"] == name]
        table[name] = {
            "mean": statistics.mean(bpc),
            "std": statistics.stdev(bpc) if len(bpc) > 1 else 0.0,
            "n": len(bpc),
        }
    result["table"] = table
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=["storage", "throughput", "quality"])
    p.add_argument("--kjv", type=Path, help="KJV text, one chapter per line (every suite)")
    p.add_argument("--qwen-tokenizer", type=Path, help="Qwen2 tokenizer directory (storage, throughput)")
    p.add_argument("--smollm", type=Path, help="SmolLM2-135M-Instruct directory (throughput, quality)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every sakd run")
    p.add_argument("--out", type=Path, default=Path("runs/bench-teacher-cache"))
    p.add_argument("--blocks", type=int, default=32, help="storage: teacher blocks of 256 tokens per case")
    p.add_argument("--steps", type=int, default=3, help="throughput: timed steps")
    p.add_argument("--warmup", type=int, default=1, help="throughput: untimed first steps")
    p.add_argument("--batch", type=int, default=2, help="throughput / quality: blocks per micro-batch")
    p.add_argument("--block", type=int, default=256, help="tokens per block")
    p.add_argument("--k", type=int, default=64, help="throughput: top-k of the cache")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-chars", type=int, default=100_000)
    p.add_argument("--eval-chars", type=int, default=30_000)
    p.add_argument(
        "--samples",
        type=int,
        nargs="+",
        default=[12, 24],
        help="quality: draws per position of each sampled cache",
    )
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()
    need = {"storage": ("kjv", "qwen_tokenizer"), "throughput": ("kjv", "qwen_tokenizer", "smollm")}
    for name in need.get(args.suite, ("kjv", "smollm")):
        flag = "--" + name.replace("_", "-")
        path = getattr(args, name)
        if path is None:
            p.error(
                f"{args.suite} needs {flag} PATH (build the assets with `sakd assets kjv|smollm2|qwen-tokenizer DIR`)"
            )
        if not path.exists():
            p.error(f"{flag} {path}: no such file or directory (build it with `sakd assets`)")
    global THREADS
    THREADS = args.threads
    t = time.perf_counter()
    result = {"storage": storage, "throughput": throughput, "quality": quality}[args.suite](args)
    result["seconds"] = round(time.perf_counter() - t, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.suite}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "rows")}, indent=1))


if __name__ == "__main__":
    main()
