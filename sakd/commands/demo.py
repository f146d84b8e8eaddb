"""`sakd demo`: the offline end-to-end demo, in the regime distillation is for.

corpus (generated: one document per line, read with ``sample_by=line``; or --data FILE, read as
``data.sample_by`` says -- the whole file is one document unless --sample-by says otherwise) -> four splits
(:mod:`sakd.commands.demo_data`: the teacher's training text, a small subset of it for the student,
validation, held-out) -> two byte-level BPE tokenizers trained on the teacher's text only (the student's, and
a larger one for the teacher, so the default path exercises cross-tokenizer alignment) -> a ``tiny-moe`` teacher pretrained on the teacher's
text with its own tokenizer (cached: it stands in for "the teacher you already have") -> per student seed,
the ``tiny-dense`` student distilled from it (KD) on the student's few documents for several epochs and, as a
baseline, the same student trained on CE only with the same initialisation, data order and steps ->
held-out perplexities and bits per byte (the teacher and every student on the same held-out documents,
strided), the share of the CE student's gap to the teacher that KD closed (against the CE seed with the lowest
validation bits per byte, with the KD seeds' spread; per seed against its own CE twin; against the CE mean), top-1
agreement with the teacher, a loss-curve PNG, the exported students and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import sakd
from sakd.commands.demo_data import (
    DemoSplits,
    cache_root,
    corpus_file,
    file_hash,
    tokenizers_for,
    train_tokenizer,
    write_splits,
)
from sakd.commands.demo_report import demo_line, evaluate_all, gap_closed, plot_curves, quality, score_bpb
from sakd.commands.quality_setup import warmup_for
from sakd.config import load_config
from sakd.data.tokenize import DATA_FORMAT_VERSION
from sakd.training import checkpoint
from sakd.training.stop_signals import TrainingStopped
from sakd.training.trainer import Distiller

__all__ = ["DEMO", "cache_root", "demo_line", "gap_closed", "run_demo", "train_tokenizer"]

# The demo's regime and budget, chosen on the validation documents (README, "What the demo does").
DEMO: dict[str, Any] = {
    "corpus_docs": 6000,
    "heldout_docs": 300,  # reported on
    "validation_docs": 300,  # settings chosen on
    "student_docs": 20,  # the student's unique training text (~1k tokens): a subset of the teacher's
    # the student's tokenizer, and the teacher's own, larger one (as in the real pairs; the teacher's
    # generated documents support at most ~1,871 BPE tokens, so larger requests stop there)
    "vocab_size": 1024,
    "teacher_vocab_size": 2048,
    "block_size": 128,
    "teacher_steps": 200,
    "teacher_batch_size": 16,
    "teacher_lr": 3e-3,
    "student_epochs": 100,
    "batch_size": 8,
    "student_lr": 3e-3,
    "alpha": 0.9,
    "temperature": 1.0,
    "seeds": 3,
}
SAMPLE_BY_WORDS = {
    "line": "one document per line",
    "paragraph": "one per blank-line separated paragraph",
    "document": "the whole file as one document",
}


def _run_config(
    out: Path,
    train: Path,
    splits: DemoSplits,
    tokenizers: tuple[Path, Path],
    budget: dict[str, Any],
    *,
    teacher: str,
    student: str,
    alpha: float,
    steps: int,
    seed: int,
) -> dict[str, Any]:
    is_student = student != teacher
    return {
        "model": {
            "teacher": teacher,
            "student": student,
            "tokenizer": str(tokenizers[0] if is_student else tokenizers[1]),
            "teacher_tokenizer": str(tokenizers[1]),
        },
        # the run's own evaluation is on the validation documents; the summary's on the held-out ones
        "data": {
            "train": str(train),
            "eval": str(splits["validation"]),
            "block_size": budget["block_size"],
            "max_eval_blocks": 32,
        },
        "distillation": {
            "loss": {"kind": "fkl", "alpha": alpha, "temperature": budget["temperature"], "chunk_size": 1024}
        },
        "optimization": {
            "learning_rate": budget["student_lr" if is_student else "teacher_lr"],
            "warmup_steps": warmup_for(20, steps),
            "lr_scheduler": "cosine",
            "weight_decay": 0.0,
        },
        "training": {
            "output_dir": str(out),
            "batch_size": budget["batch_size" if is_student else "teacher_batch_size"],
            "max_steps": steps,
            "eval_every": 0,
            "save_every": 0,
            "seed": seed,
        },
        "logging": {"log_every": 5},
    }


def _train(raw: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    cfg, _ = load_config(raw)
    if resume:
        return Distiller(cfg, resume="auto").train()
    return Distiller(cfg, resume="none", overwrite=True).train()


def prepare_teacher(splits: DemoSplits, tokenizers: tuple[Path, Path], budget: dict[str, Any]) -> Path:
    """Pretrain the ``tiny-moe`` teacher on the teacher's split once; later demos reuse the cached directory.

    A stop signal during pretraining keeps the run's checkpoint: the next demo resumes from it. Any other
    failure removes the half-trained run, so a later demo starts it afresh.
    """
    # the cache key names everything that shapes the teacher
    key = (
        f"{file_hash(splits['teacher'])}-{file_hash(tokenizers[1] / 'tokenizer.json')}-s{budget['teacher_steps']}"
        f"-b{budget['block_size']}x{budget['teacher_batch_size']}-lr{budget['teacher_lr']:g}"
        f"-d{DATA_FORMAT_VERSION}-sakd{sakd.__version__}"
    )
    cached = cache_root() / "demo-teacher" / key
    if (cached / "model.safetensors").is_file():
        print(f"[demo] reusing cached teacher {cached}")
        return cached
    work = cached.with_name(key + ".run")
    resume = checkpoint.latest(work / "checkpoints") is not None
    print(
        f"[demo] {'resuming the stopped' if resume else 'pretraining the'} tiny-moe teacher on "
        f"{splits.documents['teacher']} documents (cached for later runs)"
    )
    steps = budget["teacher_steps"]
    raw = _run_config(
        work,
        splits["teacher"],
        splits,
        tokenizers,
        budget,
        teacher="tiny-moe",
        student="tiny-moe",
        alpha=0.0,
        steps=steps,
        seed=0,
    )
    try:
        _train(raw, resume=resume)
    except TrainingStopped:
        raise  # checkpointed: the next demo resumes it
    except Exception:
        # a failure: never leave a half-trained teacher behind. Not on KeyboardInterrupt (a second Ctrl-C
        # while the stop's checkpoint is written): the complete checkpoints are kept and resumed
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(cached, ignore_errors=True)
    (work / "final").rename(cached)
    shutil.rmtree(work, ignore_errors=True)
    return cached


def _student_steps(splits: DemoSplits, budget: dict[str, Any], tokenizer_dir: Path) -> int:
    """``student_epochs`` passes over the student's packed blocks, in optimizer steps."""
    from sakd.data import pack
    from sakd.data.text import load_text_dataset
    from sakd.models import load_tokenizer

    blocks = len(
        pack(
            load_text_dataset(str(splits["student"])),
            load_tokenizer(str(tokenizer_dir)),
            budget["block_size"],
        )
    )
    return max(1, math.ceil(blocks * budget["student_epochs"] / budget["batch_size"]))


def train_students(
    out: Path, splits: DemoSplits, tokenizers: tuple[Path, Path], teacher_dir: Path, budget: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per seed: the KD student and its CE-only twin (same initialisation, data order and steps)."""
    steps = _student_steps(splits, budget, tokenizers[0])
    runs, raw = {}, {}
    for seed in range(budget["seeds"]):
        for kind, alpha in (("kd", budget["alpha"]), ("ce", 0.0)):
            name = f"{kind}_seed{seed}"
            print(f"[demo] training the {'KD' if alpha else 'CE-only'} student, seed {seed} ({steps} steps)")
            raw = _run_config(
                out / f"{kind}_student" / f"seed{seed}",
                splits["student"],
                splits,
                tokenizers,
                budget,
                teacher=str(teacher_dir),
                student="tiny-dense",
                alpha=alpha,
                steps=steps,
                seed=seed,
            )
            runs[name] = _train(raw)
    return runs, raw


def run_demo(
    output_dir: str | Path = "runs/demo",
    data: str | Path | None = None,
    budget: dict[str, Any] | None = None,
    sample_by: str | None = None,
    score_on: str = "heldout",
) -> dict[str, Any]:
    """Run the demo; ``budget`` overrides entries of :data:`DEMO` (the tests use a tiny one).

    ``sample_by`` (what one document of the text is): default ``line`` for the generated corpus (one
    document per line), ``document`` for ``data`` (as ``data.sample_by``'s default). ``score_on``:
    ``heldout`` (the summary's numbers) or ``validation`` (what the demo's settings were chosen on).
    """
    budget = {**DEMO, **(budget or {})}
    t_start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = corpus_file(out, data, budget)
    sample_by = sample_by or ("line" if data is None else "document")
    print(f"[demo] documents: data.sample_by={sample_by} ({SAMPLE_BY_WORDS[sample_by]} of {corpus.name})")
    splits = write_splits(corpus, out, budget, sample_by)
    tokenizers = tokenizers_for(splits, budget)
    t_teacher = time.perf_counter()
    teacher_dir = prepare_teacher(splits, tokenizers, budget)
    teacher_seconds = time.perf_counter() - t_teacher

    runs, raw = train_students(out, splits, tokenizers, teacher_dir, budget)
    print(f"[demo] evaluating the teacher and the students on the {score_on} documents")
    scoring = {**raw, "data": {**raw["data"], "eval": str(splits[score_on])}}
    students = {name: run["final_dir"] for name, run in runs.items()}
    results = evaluate_all(scoring, students, teacher_dir, cache_root() / "vocab_maps")
    seeds = list(range(budget["seeds"]))
    # the CE reference is chosen on the validation documents, never on the reported ones
    ce_students = {f"ce_seed{s}": students[f"ce_seed{s}"] for s in seeds}
    choice = (
        {name: results[name]["bpb"] for name in ce_students}
        if score_on == "validation"
        else score_bpb(raw, ce_students)  # raw's data.eval: the validation documents
    )
    plot = plot_curves(
        out / "loss_curves.png",
        out / "kd_student" / "seed0",
        out / "ce_student" / "seed0",
        results["teacher"]["loss"],
    )
    summary = {
        **quality(results, seeds, [choice[name] for name in ce_students]),
        "scored_on": score_on,
        "sample_by": sample_by,
        "documents": splits.documents,
        "student_vocab": results["vocab"]["student"],
        "teacher_vocab": results["vocab"]["teacher"],
        "alignment": runs["kd_seed0"].get("alignment", {}),
        "student_steps": runs["kd_seed0"]["steps"],
        "student_epochs": budget["student_epochs"],
        "alpha": budget["alpha"],
        "temperature": budget["temperature"],
        "train_seconds": round(sum(r["train_seconds"] for r in runs.values()), 2),
        "kd_train_seconds": round(sum(r["train_seconds"] for n, r in runs.items() if n.startswith("kd")), 2),
        "ce_train_seconds": round(sum(r["train_seconds"] for n, r in runs.items() if n.startswith("ce")), 2),
        "teacher_prepare_seconds": round(teacher_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "student_dir": runs["kd_seed0"]["final_dir"],
        "ce_student_dir": runs["ce_seed0"]["final_dir"],
        "teacher_dir": str(teacher_dir),
        "loss_curve_png": str(plot),
        "corpus": str(corpus),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
