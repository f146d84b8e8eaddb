"""The student-aware ablation in the data-limited regime (issue 23, item 6), where KD matters.

    python benchmarks/ablation_student_aware.py --regime data-limited --kjv kjv.txt --out OUT \
        [--student-tokens 20000] [--epochs 8] [--teacher-steps 600] [--score-on heldout] [--seeds 3]

The demo's regime (``sakd demo``), on real text: the King James Bible (``sakd assets kjv DIR``), one chapter
per line, split by chapter into held-out (every 20th chapter, reported on), validation (every 20th, offset
10: settings are chosen on it) and the teacher's text (the rest). The ``tiny-moe`` teacher is pretrained on
all of the teacher's text once (the demo's cached pretraining, cached under OUT/cache); the ``tiny-dense``
student sees only the first chapters of it (``--student-tokens`` unique student tokens, whole chapters)
for ``--epochs`` passes, 8 x 128-token blocks per step at lr 3e-3, KD with alpha 0.9 and T 1 (the demo's
recipe). Every arm shares the budget, initialisation and data order per seed. Reports held-out bits per
byte (student and teacher, each with its own tokens), the share of the CE -> teacher gap each arm closes
(against the mean CE student), and wall time per run. OUT/results.json holds every run, OUT/table.md the
mean +- sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

ARMS: dict[str, dict[str, Any]] = {
    "ce": {"loss": {"alpha": 0.0}},
    "kd": {},
    "kd+ka": {"moe": {"augment_samples": 2}},
    "kd+sar": {"moe": {"student_aware_router": True, "router_lr": 1e-3}},
    "kd+router": {"router": {"enabled": True}},
    "kd+curriculum": {"curriculum": {"phases": True, "balance": True}},
    "kd+feature": {"feature": {"weight": 0.1}},
}
BUDGET: dict[str, Any] = {
    "vocab_size": 1024,
    "teacher_vocab_size": 2048,
    "block_size": 128,
    "teacher_batch_size": 16,
    "teacher_lr": 3e-3,
    "batch_size": 8,
    "student_lr": 3e-3,
    "alpha": 0.9,
    "temperature": 1.0,
    "max_eval_blocks": 64,
}
MAX_STUDENT_TOKENS = 100_000


def bytes_per_token(tokenizer: Any, blocks: Any) -> float:
    """Bytes of text per predicted token of the held-out blocks (every position but each block's first)."""
    import torch

    from sakd.align.token_bytes import token_bytes

    table = token_bytes(tokenizer)
    lengths = torch.tensor([len(b) if b is not None else 0 for b in table], dtype=torch.float64)
    ids = torch.as_tensor(blocks[0 : len(blocks)]["input_ids"])[:, 1:]
    return float(lengths[ids].sum() / ids.numel())


def _write(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def prepare(kjv: Path, out: Path, student_tokens: int, teacher_steps: int) -> dict[str, Any]:
    """Splits, tokenizers, the student's subset and the pretrained teacher (cached under OUT/cache)."""
    from sakd.commands.demo import prepare_teacher
    from sakd.commands.demo_data import DemoSplits, train_tokenizer
    from sakd.models import load_tokenizer

    if student_tokens > MAX_STUDENT_TOKENS:
        raise SystemExit(f"--student-tokens {student_tokens} is over the regime's {MAX_STUDENT_TOKENS}")
    docs = [d.strip() for d in kjv.read_text(encoding="utf-8").splitlines() if d.strip()]
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    parts = {
        "heldout": [d for i, d in enumerate(docs) if i % 20 == 0],
        "validation": [d for i, d in enumerate(docs) if i % 20 == 10],
        "teacher": [d for i, d in enumerate(docs) if i % 10],
    }
    files = {name: _write(data / f"{name}.jsonl", texts) for name, texts in parts.items()}
    plain = data / "teacher.txt"
    plain.write_text("\n".join(parts["teacher"]) + "\n", encoding="utf-8")
    toks = (out / "tokenizer", out / "teacher_tokenizer")
    for path, size in zip(toks, (BUDGET["vocab_size"], BUDGET["teacher_vocab_size"]), strict=True):
        if not (path / "tokenizer.json").is_file():
            train_tokenizer(plain, path, size)
    tok = load_tokenizer(str(toks[0]))
    subset, count = [], 0
    for doc in parts["teacher"]:  # whole chapters, in order, up to the token budget
        n = len(tok(doc)["input_ids"]) + 1
        if count + n > student_tokens and subset:
            break
        subset.append(doc)
        count += n
    files["student"] = _write(data / f"student-{student_tokens}.jsonl", subset)
    splits = DemoSplits(files, {k: len(v) for k, v in {**parts, "student": subset}.items()})
    t0 = time.perf_counter()
    teacher = prepare_teacher(splits, toks, {**BUDGET, "teacher_steps": teacher_steps})
    return {
        "files": files,
        "tokenizers": toks,
        "teacher": teacher,
        "teacher_seconds": time.perf_counter() - t0,
        "student_docs": len(subset),
        "student_tokens": count,
    }


def student_steps(setup: dict[str, Any], epochs: float) -> int:
    from sakd.data import pack
    from sakd.data.text import load_text_dataset
    from sakd.models import load_tokenizer

    tok = load_tokenizer(str(setup["tokenizers"][0]))
    blocks = len(pack(load_text_dataset(str(setup["files"]["student"])), tok, BUDGET["block_size"]))
    return max(1, math.ceil(blocks * epochs / BUDGET["batch_size"]))


def recipe(setup: dict[str, Any], out: Path, arm: str, seed: int, steps: int, score_on: str) -> dict:
    raw: dict[str, Any] = {
        "model": {
            "teacher": str(setup["teacher"]),
            "student": "tiny-dense",
            "tokenizer": str(setup["tokenizers"][0]),
            "teacher_tokenizer": str(setup["tokenizers"][1]),
        },
        "data": {
            "train": str(setup["files"]["student"]),
            "eval": str(setup["files"][score_on]),
            "block_size": BUDGET["block_size"],
            "max_eval_blocks": BUDGET["max_eval_blocks"],
        },
        "distillation": {
            "loss": {
                "kind": "fkl",
                "alpha": BUDGET["alpha"],
                "temperature": BUDGET["temperature"],
                "chunk_size": 1024,
            }
        },
        "optimization": {
            "learning_rate": BUDGET["student_lr"],
            "warmup_steps": max(1, min(20, steps // 10)),
            "lr_scheduler": "cosine",
            "weight_decay": 0.0,
        },
        "training": {
            "output_dir": str(out),
            "batch_size": BUDGET["batch_size"],
            "max_steps": steps,
            "eval_every": 0,
            "save_every": 0,
            "seed": seed,
        },
        "logging": {"log_every": 20, "progress_bar": False},
    }
    for section, values in ARMS[arm].items():
        raw["distillation"].setdefault(section, {}).update(copy.deepcopy(values))
    return raw


def train_arm(raw: dict[str, Any]) -> dict[str, float]:

    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    cfg, _ = load_config(raw)
    t0 = time.perf_counter()
    d = Distiller(cfg, resume="none", overwrite=True)
    summary = d.train()
    return {
        "bpb": summary["eval_loss"] / math.log(2) / bytes_per_token(d.tokenizer, d.data.eval),
        "train_seconds": summary["train_seconds"],
        "wall_seconds": time.perf_counter() - t0,
        "steps": summary["steps"],
    }


def teacher_bpb(setup: dict[str, Any], score_on: str) -> float:
    """The teacher's bits per byte on the same split, with its own tokens (first max_eval_blocks blocks)."""
    from transformers import AutoModelForCausalLM

    from sakd.config import load_config
    from sakd.data import prepare_data
    from sakd.evaluation.heldout import evaluate
    from sakd.models import load_tokenizer

    cfg, _ = load_config(
        {
            "data": {
                "train": str(setup["files"]["student"]),
                "eval": str(setup["files"][score_on]),
                "block_size": BUDGET["block_size"],
                "max_eval_blocks": BUDGET["max_eval_blocks"],
            }
        }
    )
    tok = load_tokenizer(str(setup["tokenizers"][1]))
    blocks = prepare_data(cfg.data, tok, 0).eval
    model = AutoModelForCausalLM.from_pretrained(setup["teacher"]).eval()
    out = evaluate(model, blocks, batch_size=16)
    return out["loss"] / math.log(2) / bytes_per_token(tok, blocks)


def table(results: list[dict], arms: list[str], teacher: float) -> str:
    by_arm: dict[str, list[dict]] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    ce = statistics.fmean(r["bpb"] for r in by_arm["ce"]) if "ce" in by_arm else float("nan")
    lines = [
        "| arm | held-out bits per byte | gap closed | vs KD | seeds | s per run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    kd = statistics.fmean(r["bpb"] for r in by_arm["kd"]) if "kd" in by_arm else float("nan")
    for arm in arms:
        runs = by_arm.get(arm, [])
        if not runs:
            continue
        bpbs = [r["bpb"] for r in runs]
        mean, sd = statistics.fmean(bpbs), statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0
        gaps = [(ce - b) / (ce - teacher) * 100 for b in bpbs]
        gsd = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        secs = statistics.fmean(r["wall_seconds"] for r in runs)
        lines.append(
            f"| {arm} | {mean:.4f} ± {sd:.4f} | {statistics.fmean(gaps):.1f} % ± {gsd:.1f} | "
            f"{mean - kd:+.4f} | {len(runs)} | {secs:.0f} |"
        )
    return "\n".join(lines) + f"\n\nteacher: {teacher:.4f} bits per byte; CE student mean {ce:.4f}\n"


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", default="data-limited")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation-data-limited"))
    parser.add_argument("--kjv", type=Path, required=True, help="King James Bible text (sakd assets kjv DIR)")
    parser.add_argument("--student-tokens", type=int, default=20_000)
    parser.add_argument("--epochs", type=float, default=8.0)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--score-on", choices=("validation", "heldout"), default="heldout")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seed ids")
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    args = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SAKD_CACHE_DIR", str(args.out / "cache"))
    setup = prepare(args.kjv, args.out, args.student_tokens, args.teacher_steps)
    steps = student_steps(setup, args.epochs)
    teacher = teacher_bpb(setup, args.score_on)
    print(
        f"[ablation] student subset: {setup['student_docs']} chapters, {setup['student_tokens']} tokens; "
        f"{steps} steps ({args.epochs:g} epochs); teacher {args.score_on} bpb {teacher:.4f} "
        f"(prepared in {setup['teacher_seconds']:.0f} s)",
        flush=True,
    )
    tag = f"{args.score_on}-t{args.student_tokens}-e{args.epochs:g}"
    results_path = args.out / f"results-{tag}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["arm"], r["seed"]) for r in results}
    for seed in args.seeds:
        for arm in args.arms:
            if (arm, seed) in done:
                continue
            raw = recipe(setup, args.out / "runs" / tag / f"{arm}-s{seed}", arm, seed, steps, args.score_on)
            metrics = train_arm(raw)
            results.append({"arm": arm, "seed": seed, **metrics, "config": raw["distillation"]})
            results_path.write_text(json.dumps(results, indent=1))
            print(f"[ablation] {arm} seed {seed}: {metrics}", flush=True)
    text = table(results, args.arms, teacher)
    ce = [r["bpb"] for r in results if r["arm"] == "ce"]
    if ce:
        ratio = statistics.fmean(ce) / teacher
        text += f"CE / teacher bits per byte: {ratio:.2f}x (target >= 2x)\n"
    (args.out / f"table-{tag}.md").write_text(text)
    print(text)
