"""`sakd demo`: the offline end-to-end demo.

corpus (generated: one document per line, read with ``sample_by=line``; or --data FILE, read as
``data.sample_by`` says -- the whole file is one document unless --sample-by says otherwise) -> two
byte-level BPE tokenizers trained on it (the student's,
and a larger one for the teacher, so the default path exercises cross-tokenizer alignment) -> a
``tiny-moe`` teacher pretrained briefly on it with its own tokenizer (cached: it stands in for "the teacher you already have") ->
the ``tiny-dense`` student distilled from it (KD) and, as a baseline, the same student trained on
CE only with the same data order and step budget -> held-out perplexities and bits per byte (all three
models on the same held-out documents, strided scoring), top-1 agreement with the teacher, a loss-curve
PNG, the exported student and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import sakd
from sakd.align import load_or_build_vocab_map
from sakd.config import load_config
from sakd.data import prepare_data, split_documents, text_stream
from sakd.data.synthetic import write_corpus
from sakd.data.tokenize import DATA_FORMAT_VERSION
from sakd.evaluation.heldout import cross_tokenizer_agreement, evaluate
from sakd.models import load_tokenizer
from sakd.training import checkpoint
from sakd.training.stop_signals import TrainingStopped
from sakd.training.trainer import Distiller

# Budgets measured to keep the whole demo within ~5 minutes on 2 CPU cores (see README).
DEMO = {
    "corpus_docs": 6000,
    # the student's tokenizer, and the teacher's own, larger one (as in the real pairs; the generated
    # corpus supports at most ~1,870 BPE tokens, so larger requests stop there)
    "vocab_size": 1024,
    "teacher_vocab_size": 2048,
    "block_size": 128,
    "teacher_steps": 600,
    "student_steps": 200,
    "batch_size": 16,
}
# Held-out scoring of the demo's summary: strided windows of block_size tokens advanced by half a block.
EVAL_STRIDE_FRACTION = 2


_SAMPLE_BY_WORDS = {
    "line": "one document per line",
    "paragraph": "one per blank-line separated paragraph",
    "document": "the whole file as one document",
}


def cache_root() -> Path:
    return Path(os.environ.get("SAKD_CACHE_DIR", Path.home() / ".cache" / "sakd"))


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer trained on ``corpus``, saved as a transformers tokenizer directory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _run_config(
    out: Path,
    corpus: Path,
    tokenizer: Path,
    budget: dict[str, int],
    *,
    teacher_tokenizer: Path | None = None,
    teacher: str,
    student: str,
    alpha: float,
    steps: int,
    lr: float,
    sample_by: str,
) -> dict[str, Any]:
    return {
        "model": {
            "teacher": teacher,
            "student": student,
            "tokenizer": str(tokenizer),
            "teacher_tokenizer": None if teacher_tokenizer is None else str(teacher_tokenizer),
        },
        "data": {
            "train": str(corpus),
            "sample_by": sample_by,
            "block_size": budget["block_size"],
            "max_eval_blocks": 128,
        },
        # T=1: on this corpus T=2 made the student worse than CE-only (measured; see README).
        "distillation": {"loss": {"kind": "fkl", "alpha": alpha, "temperature": 1.0, "chunk_size": 1024}},
        "optimization": {
            "learning_rate": lr,
            "warmup_steps": 20,
            "lr_scheduler": "cosine",
            "weight_decay": 0.0,
        },
        "training": {
            "output_dir": str(out),
            "batch_size": budget["batch_size"],
            "max_steps": steps,
            "eval_every": 0,
            "save_every": 0,
            "seed": 0,
        },
        "logging": {"log_every": 5},
    }


def _train(raw: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    cfg, _ = load_config(raw)
    if resume:
        return Distiller(cfg, resume="auto").train()
    return Distiller(cfg, resume="none", overwrite=True).train()


def prepare_teacher(corpus: Path, tokenizer: Path, key: str, budget: dict[str, int], sample_by: str) -> Path:
    """Pretrain the ``tiny-moe`` teacher on the corpus once; later demos reuse the cached directory.

    A stop signal during pretraining keeps the run's checkpoint: the next demo resumes from it. Any other
    failure removes the half-trained run, so a later demo starts it afresh.
    """
    cached = cache_root() / "demo-teacher" / key
    if (cached / "model.safetensors").is_file():
        print(f"[demo] reusing cached teacher {cached}")
        return cached
    work = cached.with_name(key + ".run")
    resume = checkpoint.latest(work / "checkpoints") is not None
    print(
        f"[demo] {'resuming the stopped' if resume else 'pretraining the'} tiny-moe teacher (cached for later runs)"
    )
    raw = _run_config(
        work,
        corpus,
        tokenizer,
        budget,
        teacher="tiny-moe",
        student="tiny-moe",
        alpha=0.0,
        steps=budget["teacher_steps"],
        lr=2e-3,
        sample_by=sample_by,
    )
    try:
        _train(raw, resume=resume)
    except TrainingStopped:
        raise  # checkpointed: the next demo resumes it
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # never leave a half-trained teacher behind
        raise
    shutil.rmtree(cached, ignore_errors=True)
    (work / "final").rename(cached)
    shutil.rmtree(work, ignore_errors=True)
    return cached


def _curve(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            steps.append(rec["step"])
            values.append(rec[key])
    return steps, values


def plot_curves(out: Path, kd_dir: Path, ce_dir: Path, teacher_loss: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, label in ((kd_dir, "KD student"), (ce_dir, "CE-only student")):
        ax.plot(*_curve(run, "ce"), label=f"{label}: train CE")
    ax.axhline(teacher_loss, color="k", ls="--", lw=1, label="teacher: held-out CE")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title("sakd demo: tiny-moe teacher -> tiny-dense student")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _corpus(out: Path, data: str | Path | None, budget: dict[str, int]) -> Path:
    if data is None:
        corpus = write_corpus(out / "corpus.txt", num_docs=budget["corpus_docs"])
        print(f"[demo] generated corpus {corpus}")
        return corpus
    corpus = Path(data)
    if not corpus.is_file():
        raise FileNotFoundError(f"demo data file not found: {data}")
    return corpus


def _tokenizers(corpus: Path, budget: dict[str, int]) -> tuple[Path, Path]:
    """The student's and the teacher's tokenizer directories, trained on the corpus once (cached)."""
    toks = {}
    for role, size in (("student", budget["vocab_size"]), ("teacher", budget["teacher_vocab_size"])):
        key = f"{_file_hash(corpus)}-v{size}"
        toks[role] = cache_root() / "demo-tokenizer" / key
        if not (toks[role] / "tokenizer.json").is_file():
            print(f"[demo] training the {role}'s byte-level BPE tokenizer ({size} tokens) on the corpus")
            train_tokenizer(corpus, toks[role], size)
    return toks["student"], toks["teacher"]


def _evaluate_all(
    kd_raw: dict[str, Any],
    runs: dict[str, dict[str, Any]],
    tok_dir: Path,
    teacher_tok_dir: Path,
    teacher_dir: Path,
) -> dict[str, dict[str, Any]]:
    """Held-out loss, perplexity (per each model's own tokens) and bits per byte of the teacher and both
    students -- all three on the same held-out documents, strided -- and each student's agreement with
    the teacher at the anchors."""
    cfg, _ = load_config(kd_raw)
    tokenizer, teacher_tok = load_tokenizer(str(tok_dir)), load_tokenizer(str(teacher_tok_dir))
    _, eval_docs = split_documents(cfg.data, cfg.training.seed)
    window = cfg.data.block_size
    scoring = {"batch_size": 16, "window": window, "stride": window // EVAL_STRIDE_FRACTION}
    aligned = prepare_data(cfg.data, tokenizer, cfg.training.seed, teacher_tok)
    vmap, _ = load_or_build_vocab_map(tokenizer, teacher_tok, cache_root() / "vocab_maps")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    results: dict[str, dict[str, Any]] = {
        "teacher": evaluate(teacher, text_stream(eval_docs, teacher_tok), **scoring)
    }
    student_stream = text_stream(eval_docs, tokenizer)
    for name in ("kd", "ce"):
        student = AutoModelForCausalLM.from_pretrained(runs[name]["final_dir"]).eval()
        results[name] = evaluate(student, student_stream, **scoring)
        results[name].update(
            cross_tokenizer_agreement(
                student,
                teacher,
                aligned,
                vmap.student_to_teacher,
                batch_size=16,
                vocab_size=len(tokenizer),
                teacher_vocab_size=len(teacher_tok),
            )
        )
    results["vocab"] = {"student": len(tokenizer), "teacher": len(teacher_tok)}
    results["documents"] = {"eval": len(eval_docs)}
    return results


def gap_closed(teacher: float, kd: float, ce: float) -> float | None:
    """The share of the CE-only student's distance to the teacher that KD closed: 1 = KD reached the
    teacher, 0 = no better than CE-only, < 0 = worse (None when CE-only already matches the teacher)."""
    return None if ce == teacher else (ce - kd) / (ce - teacher)


def _quality(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary's held-out figures: perplexities (per each model's own tokens), bits per byte (one
    scale for all three), the share of the CE-only student's gap to the teacher that KD closed."""
    kd_beats_ce = results["kd"]["ppl"] < results["ce"]["ppl"]
    bpb = {name: results[name]["bpb"] for name in ("teacher", "kd", "ce")}
    return {
        "teacher_ppl": results["teacher"]["ppl"],
        "kd_student_ppl": results["kd"]["ppl"],
        "ce_student_ppl": results["ce"]["ppl"],
        "teacher_bpb": bpb["teacher"],
        "kd_student_bpb": bpb["kd"],
        "ce_student_bpb": bpb["ce"],
        "kd_gap_closed": gap_closed(bpb["teacher"], bpb["kd"], bpb["ce"]),
        "kd_student_agreement": results["kd"]["agreement"],
        "ce_student_agreement": results["ce"]["agreement"],
        "teacher_loss": results["teacher"]["loss"],
        "kd_student_loss": results["kd"]["loss"],
        "ce_student_loss": results["ce"]["loss"],
        "kd_beats_ce": kd_beats_ce,
        "verdict": (
            "KD student beats the CE-only student at equal budget"
            if kd_beats_ce
            else "KD did NOT beat the CE-only baseline on this corpus at this budget"
        ),
        "eval_method": results["kd"]["method"],
        "eval_window": results["kd"]["window"],
        "eval_stride": results["kd"]["stride"],
        "eval_documents": results["documents"]["eval"],
        "eval_tokens": results["kd"]["tokens"],
        "teacher_eval_tokens": results["teacher"]["tokens"],
        "eval_bytes": results["kd"]["bytes"],
        "teacher_eval_bytes": results["teacher"]["bytes"],
    }


def run_demo(
    output_dir: str | Path = "runs/demo",
    data: str | Path | None = None,
    budget: dict[str, int] | None = None,
    sample_by: str | None = None,
) -> dict[str, Any]:
    """Run the demo; ``budget`` overrides entries of :data:`DEMO` (the tests use a tiny one).

    ``sample_by`` (what one document of the text is): default ``line`` for the generated corpus (one
    document per line), ``document`` for ``data`` (as ``data.sample_by``'s default).
    """
    budget = {**DEMO, **(budget or {})}
    t_start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = _corpus(out, data, budget)
    sample_by = sample_by or ("line" if data is None else "document")
    print(f"[demo] documents: data.sample_by={sample_by} ({_SAMPLE_BY_WORDS[sample_by]} of {corpus.name})")
    tok_dir, teacher_tok_dir = _tokenizers(corpus, budget)
    # the teacher is trained on the packed data: its cache key names everything that shapes that data
    teacher_key = (
        f"{_file_hash(corpus)}-v{budget['teacher_vocab_size']}-s{budget['teacher_steps']}"
        f"-b{budget['block_size']}x{budget['batch_size']}-{sample_by}-d{DATA_FORMAT_VERSION}"
        f"-sakd{sakd.__version__}"
    )
    t_teacher = time.perf_counter()
    teacher_dir = prepare_teacher(corpus, teacher_tok_dir, teacher_key, budget, sample_by)
    teacher_seconds = time.perf_counter() - t_teacher

    raws, runs = {}, {}
    for name, alpha in (("kd", 0.5), ("ce", 0.0)):
        print(f"[demo] training the {'KD' if alpha else 'CE-only'} student")
        raws[name] = _run_config(
            out / f"{name}_student",
            corpus,
            tok_dir,
            budget,
            teacher_tokenizer=teacher_tok_dir,
            teacher=str(teacher_dir),
            student="tiny-dense",
            alpha=alpha,
            steps=budget["student_steps"],
            lr=3e-3,
            sample_by=sample_by,
        )
        runs[name] = _train(raws[name])

    print("[demo] evaluating teacher and students on held-out text")
    results = _evaluate_all(raws["kd"], runs, tok_dir, teacher_tok_dir, teacher_dir)
    plot = plot_curves(
        out / "loss_curves.png", out / "kd_student", out / "ce_student", results["teacher"]["loss"]
    )
    summary = {
        **_quality(results),
        "sample_by": sample_by,
        "student_vocab": results["vocab"]["student"],
        "teacher_vocab": results["vocab"]["teacher"],
        "alignment": runs["kd"].get("alignment", {}),
        "student_steps": budget["student_steps"],
        "train_seconds": round(runs["kd"]["train_seconds"] + runs["ce"]["train_seconds"], 2),
        "kd_train_seconds": runs["kd"]["train_seconds"],
        "ce_train_seconds": runs["ce"]["train_seconds"],
        "teacher_prepare_seconds": round(teacher_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "student_dir": runs["kd"]["final_dir"],
        "ce_student_dir": runs["ce"]["final_dir"],
        "teacher_dir": str(teacher_dir),
        "loss_curve_png": str(plot),
        "corpus": str(corpus),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
