"""Ablation of sakd's student-aware parts: does each one help a small student learn from an MoE teacher?

    python benchmarks/ablation_student_aware.py --out runs/ablation --kjv kjv.txt [--seeds 3] [--steps 200]
    python benchmarks/ablation_student_aware.py --regime data-limited --kjv kjv.txt --out OUT [...]

``--regime data-limited`` runs the ablation where KD matters (issue 23, item 6): see
``benchmarks/ablation_data_limited.py`` for its splits, budget and options. The rest of this docstring is
the original regime (``--regime single-pass``, the default): every student far from trained.

For each corpus -- the demo's generated corpus and real English text (the King James Bible; build it with
``sakd assets kjv DIR``, which needs Debian's ``bible-kjv``) -- the corpus is split by
document into training text and a fixed held-out file; two byte-level BPE tokenizers are trained on it (the
student's, 1,024 tokens, and the teacher's, 2,048: the cross-tokenizer path); the ``tiny-moe`` teacher
(Qwen3-MoE, 4 experts, top-2) is pretrained on it by sakd; then the ``tiny-dense`` student is trained by
every arm below with the same budget (steps, batch, learning rate, data order per seed), for each seed.
Every run reports held-out perplexity (per student token), bits per byte of held-out text, top-1 agreement
with the teacher at the anchors, and training tokens/s. ``results.json`` holds every run; ``table.md`` the
mean ± sample standard deviation over seeds. The ``best`` arm combines the components whose mean held-out
bits per byte beat KD's on both corpora (KD itself when none does).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from ablation_data_limited import bytes_per_token  # benchmarks/ is the script's folder

ARMS: dict[str, dict[str, Any]] = {
    "ce": {"loss": {"alpha": 0.0}},
    "kd": {},
    "kd+ka": {"moe": {"augment_samples": 2}},
    "kd+sar": {"moe": {"student_aware_router": True, "router_lr": 1e-3}},
    "kd+router": {"router": {"enabled": True}},
    "kd+feature": {"feature": {"weight": 0.1}},
    "kd+feature+curriculum": {"feature": {"weight": 0.1}, "curriculum": {"phases": True, "balance": True}},
}
COMPONENTS = ("kd+ka", "kd+sar", "kd+router", "kd+feature+curriculum")
BUDGET = {"vocab_size": 1024, "teacher_vocab_size": 2048, "block_size": 128, "batch_size": 16}


def split_corpus(text_file: Path, out: Path, max_docs: int | None) -> tuple[Path, Path]:
    """Training and held-out files (every 20th document held out), one document per line."""
    docs = [d.strip() for d in text_file.read_text(encoding="utf-8").splitlines() if d.strip()]
    docs = docs[:max_docs] if max_docs else docs
    train, held = out / "train.txt", out / "heldout.txt"
    train.write_text("\n".join(d for i, d in enumerate(docs) if i % 20) + "\n", encoding="utf-8")
    held.write_text("\n".join(d for i, d in enumerate(docs) if i % 20 == 0) + "\n", encoding="utf-8")
    return train, held


def recipe(corpus: dict[str, Path], out: Path, arm: str, seed: int, steps: int) -> dict[str, Any]:
    """The run config of one arm: the demo's student recipe (T=1, alpha 0.5) plus the arm's keys."""
    raw: dict[str, Any] = {
        "model": {
            "teacher": str(corpus["teacher"]),
            "student": "tiny-dense",
            "tokenizer": str(corpus["tokenizer"]),
            "teacher_tokenizer": str(corpus["teacher_tokenizer"]),
        },
        "data": {
            "train": str(corpus["train"]),
            "sample_by": "line",  # one document per line
            "eval": str(corpus["heldout"]),
            "block_size": BUDGET["block_size"],
            "max_eval_blocks": 96,
        },
        "distillation": {"loss": {"kind": "fkl", "alpha": 0.5, "temperature": 1.0, "chunk_size": 1024}},
        "optimization": {
            "learning_rate": 3e-3,
            "warmup_steps": 20,
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
        "logging": {"log_every": 10, "progress_bar": False},
    }
    for section, values in ARMS.get(arm, {}).items():
        raw["distillation"].setdefault(section, {}).update(copy.deepcopy(values))
    return raw


def train_arm(raw: dict[str, Any], corpus: dict[str, Any]) -> dict[str, float]:
    """Train one arm; held-out perplexity and bits per byte of the trained student, its top-1 agreement
    with the teacher at the anchors (measured the same way for every arm, the CE-only one included)."""
    from transformers import AutoModelForCausalLM

    from sakd.config import load_config
    from sakd.evaluation.heldout import cross_tokenizer_agreement
    from sakd.training.trainer import Distiller

    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    summary = d.train()
    per_token_bytes = bytes_per_token(d.tokenizer, d.data.eval)
    ev = corpus["eval"]
    student = AutoModelForCausalLM.from_pretrained(summary["final_dir"]).eval()
    agreement = cross_tokenizer_agreement(
        student,
        ev["teacher"],
        ev["data"],
        ev["vocab_map"],
        batch_size=16,
        vocab_size=len(d.tokenizer),
        teacher_vocab_size=ev["teacher_vocab"],
    )["agreement"]
    return {
        "ppl": summary["eval_ppl"],
        "bpb": summary["eval_loss"] / math.log(2) / per_token_bytes,
        "agreement": agreement,
        "tokens_per_s": summary["tokens_seen"] / summary["train_seconds"],
    }


def agreement_setup(corpus: dict[str, Any]) -> dict[str, Any]:
    """The teacher, the held-out blocks paired with its tokens, and the vocabulary map (once per corpus)."""
    from transformers import AutoModelForCausalLM

    from sakd.align import load_or_build_vocab_map
    from sakd.commands.demo import cache_root
    from sakd.config import load_config
    from sakd.data import prepare_data
    from sakd.models import load_tokenizer

    cfg, _ = load_config(recipe(corpus, Path("unused"), "kd", 0, 1))
    tok, teacher_tok = (
        load_tokenizer(str(corpus["tokenizer"])),
        load_tokenizer(str(corpus["teacher_tokenizer"])),
    )
    vmap, _ = load_or_build_vocab_map(tok, teacher_tok, cache_root() / "vocab_maps")
    return {
        "teacher": AutoModelForCausalLM.from_pretrained(corpus["teacher"]).eval(),
        "data": prepare_data(cfg.data, tok, 0, teacher_tok),
        "vocab_map": vmap.student_to_teacher,
        "teacher_vocab": len(teacher_tok),
    }


def prepare_corpus(
    name: str, source: Path | None, out: Path, max_docs: int | None, teacher_steps: int
) -> dict:
    from bench_teacher import pretrained_teacher

    from sakd.commands.demo import train_tokenizer
    from sakd.data.synthetic import write_corpus

    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = write_corpus(work / "corpus.txt", num_docs=6000)
    train, held = split_corpus(source, work, max_docs)
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer(train, tok, BUDGET["vocab_size"])
    teacher_tok = work / "teacher_tokenizer"
    if not (teacher_tok / "tokenizer.json").is_file():
        train_tokenizer(train, teacher_tok, BUDGET["teacher_vocab_size"])
    budget = {**BUDGET, "teacher_steps": teacher_steps}
    t0 = time.perf_counter()
    teacher = pretrained_teacher(train, teacher_tok, f"ablation-{name}", budget, "line")
    return {
        "train": train,
        "heldout": held,
        "tokenizer": tok,
        "teacher_tokenizer": teacher_tok,
        "teacher": teacher,
        "teacher_seconds": time.perf_counter() - t0,
    }


def teacher_quality(corpus: dict) -> dict[str, float]:
    """The teacher's own held-out perplexity and bits per byte (its tokens)."""
    from transformers import AutoModelForCausalLM

    from sakd.config import load_config
    from sakd.data import prepare_data
    from sakd.evaluation.heldout import evaluate
    from sakd.models import load_tokenizer

    cfg, _ = load_config(
        {
            "data": {
                "train": str(corpus["train"]),
                "sample_by": "line",  # one document per line
                "eval": str(corpus["heldout"]),
                "block_size": BUDGET["block_size"],
                "max_eval_blocks": 96,
            }
        }
    )
    tok = load_tokenizer(str(corpus["teacher_tokenizer"]))
    blocks = prepare_data(cfg.data, tok, 0).eval
    model = AutoModelForCausalLM.from_pretrained(corpus["teacher"]).eval()
    out = evaluate(model, blocks, batch_size=16)
    return {"ppl": out["ppl"], "bpb": out["loss"] / math.log(2) / bytes_per_token(tok, blocks)}


def summarise(results: list[dict]) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["corpus"], r["arm"]), []).append(r)
    out = {}
    for key, runs in groups.items():
        out[key] = {}
        for metric in ("ppl", "bpb", "agreement", "tokens_per_s"):
            values = [r[metric] for r in runs]
            out[key][metric] = (
                statistics.fmean(values),
                statistics.stdev(values) if len(values) > 1 else 0.0,
            )
    return out


def table(summary: dict, corpora: list[str], arms: list[str]) -> str:
    lines = [
        "| corpus | arm | held-out ppl | bits per byte | teacher agreement | tokens/s | cost vs KD |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for corpus in corpora:
        kd_speed = summary[(corpus, "kd")]["tokens_per_s"][0]
        for arm in arms:
            if (corpus, arm) not in summary:
                continue
            s = summary[(corpus, arm)]
            cells = [f"{s[m][0]:.4g} ± {s[m][1]:.2g}" for m in ("ppl", "bpb", "agreement")]
            speed = s["tokens_per_s"][0]
            lines.append(
                f"| {corpus} | {arm} | {' | '.join(cells)} | {speed:.0f} | {kd_speed / speed:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def best_arm(summary: dict, corpora: list[str]) -> dict[str, Any]:
    """The components that beat KD on held-out bits per byte on every corpus, merged into one arm."""
    merged: dict[str, Any] = {}
    for arm in COMPONENTS:
        if all(summary[(c, arm)]["bpb"][0] < summary[(c, "kd")]["bpb"][0] for c in corpora):
            for section, values in ARMS[arm].items():
                merged.setdefault(section, {}).update(copy.deepcopy(values))
    if merged.get("moe", {}).get("augment_samples") and merged["moe"].get("student_aware_router"):
        merged["moe"].pop("student_aware_router")  # they exclude each other; KA is the cheaper one
        merged["moe"].pop("router_lr", None)
    return merged


@contextlib.contextmanager
def locked(path: Path | None):
    """Hold an exclusive lock on ``path`` (a machine-wide lock for timed work) for one run at a time, so a
    long ablation measures every run alone without keeping other heavy jobs waiting for hours."""
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def main() -> None:
    import sys

    if "--regime" in sys.argv:
        regime = sys.argv[sys.argv.index("--regime") + 1]
        if regime == "data-limited":
            from ablation_data_limited import main as data_limited

            data_limited(sys.argv[1:])
            return
        if regime != "single-pass":
            raise SystemExit(f"--regime must be single-pass or data-limited, not {regime!r}")
        sys.argv[sys.argv.index("--regime") : sys.argv.index("--regime") + 2] = []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--kjv", type=Path, default=None, help="King James Bible text (sakd assets kjv DIR)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--kjv-docs", type=int, default=None, help="use only the first N chapters of the KJV")
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    parser.add_argument("--lock", type=Path, default=None, help="take this file lock around each run")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SAKD_CACHE_DIR", str(args.out / "cache"))
    torch.manual_seed(0)
    with locked(args.lock):
        corpora = {"demo": prepare_corpus("demo", None, args.out, None, args.teacher_steps)}
        if args.kjv is not None:
            corpora["kjv"] = prepare_corpus("kjv", args.kjv, args.out, args.kjv_docs, args.teacher_steps)
        for corpus in corpora.values():
            corpus["eval"] = agreement_setup(corpus)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else []
    done = {(r["corpus"], r["arm"], r["seed"]) for r in results}

    def run(corpus: str, arm: str, seed: int) -> None:
        if (corpus, arm, seed) in done:
            return
        raw = recipe(corpora[corpus], args.out / corpus / "runs" / f"{arm}-s{seed}", arm, seed, args.steps)
        with locked(args.lock):
            metrics = train_arm(raw, corpora[corpus])
        record = {"corpus": corpus, "arm": arm, "seed": seed, **metrics, "config": raw["distillation"]}
        results.append(record)
        results_path.write_text(json.dumps(results, indent=1))
        print(f"[ablation] {corpus} {arm} seed {seed}: {metrics}", flush=True)

    for corpus in corpora:
        for seed in range(args.seeds):
            for arm in args.arms:
                run(corpus, arm, seed)
    summary = summarise(results)
    names = list(corpora)
    ARMS["best"] = best_arm(summary, names)
    for corpus in corpora:
        for seed in range(args.seeds):
            run(corpus, "best", seed)
    summary = summarise(results)
    with locked(args.lock):
        teachers = {c: teacher_quality(corpora[c]) for c in corpora}
    text = table(summary, names, [*args.arms, "best"])
    text += "\nbest = " + json.dumps(ARMS["best"]) + "\n"
    text += "".join(
        f"\nteacher ({c}): ppl {t['ppl']:.3f}, bits per byte {t['bpb']:.4f}" for c, t in teachers.items()
    )
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
