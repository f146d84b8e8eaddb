"""The demo's numbers: held-out scoring of the teacher and every student, the share of the CE student's gap
to the teacher that KD closed (per seed, with the spread), and the loss-curve PNG."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from sakd.align import load_or_build_vocab_map
from sakd.config import load_config
from sakd.data import prepare_data, text_stream
from sakd.data.text import load_text_dataset
from sakd.evaluation.heldout import cross_tokenizer_agreement, evaluate
from sakd.models import load_tokenizer

# Held-out scoring of the demo's summary: strided windows of block_size tokens advanced by half a block.
EVAL_STRIDE_FRACTION = 2


def evaluate_all(
    raw: dict[str, Any],
    students: dict[str, str],
    teacher_dir: Path,
    vocab_maps: Path,
) -> dict[str, dict[str, Any]]:
    """Loss, perplexity (per each model's own tokens) and bits per byte of the teacher and every student
    (``students``: name -> model directory) -- all on ``raw``'s ``data.eval`` documents, strided -- and each
    student's top-1 agreement with the teacher at the anchors."""
    cfg, _ = load_config(raw)
    tokenizer, teacher_tok = load_tokenizer(cfg.model.tokenizer), load_tokenizer(cfg.model.teacher_tokenizer)
    docs = load_text_dataset(cfg.data.eval)
    window = cfg.data.block_size
    scoring = {"batch_size": 16, "window": window, "stride": window // EVAL_STRIDE_FRACTION}
    aligned = prepare_data(cfg.data, tokenizer, cfg.training.seed, teacher_tok)
    vmap, _ = load_or_build_vocab_map(tokenizer, teacher_tok, vocab_maps)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    results: dict[str, dict[str, Any]] = {
        "teacher": evaluate(teacher, text_stream(docs, teacher_tok), **scoring)
    }
    student_stream = text_stream(docs, tokenizer)
    for name, model_dir in students.items():
        student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
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
    results["documents"] = {"eval": len(docs)}
    return results


def gap_closed(teacher: float, kd: float, ce: float) -> float | None:
    """The share of the CE-only student's distance to the teacher that KD closed: 1 = KD reached the
    teacher, 0 = no better than CE-only, < 0 = worse (None when CE-only already matches the teacher)."""
    return None if ce == teacher else (ce - kd) / (ce - teacher)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _spread(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "min": None, "max": None}
    return {"mean": _mean(known), "min": min(known), "max": max(known)}


def quality(results: dict[str, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The summary's held-out figures, means over the student seeds. ``kd_gap_closed`` is measured against
    the best CE seed (the lowest CE bits per byte): each KD seed's share of that CE student's gap to the
    teacher, then their mean (``kd_gap_closed_min``/``_max``: the spread; ``per_seed`` also gives each
    seed's share against its own CE twin)."""
    teacher_bpb = results["teacher"]["bpb"]
    kd = [results[f"kd_seed{s}"] for s in seeds]
    ce = [results[f"ce_seed{s}"] for s in seeds]
    best_ce = min(r["bpb"] for r in ce)
    closed = [gap_closed(teacher_bpb, r["bpb"], best_ce) for r in kd]
    spread = _spread(closed)
    per_seed = [
        {
            "seed": s,
            "kd_student_bpb": k["bpb"],
            "ce_student_bpb": c["bpb"],
            "kd_student_ppl": k["ppl"],
            "ce_student_ppl": c["ppl"],
            "kd_gap_closed": g,
            "kd_gap_closed_vs_same_seed_ce": gap_closed(teacher_bpb, k["bpb"], c["bpb"]),
            "kd_student_agreement": k["agreement"],
            "ce_student_agreement": c["agreement"],
        }
        for s, k, c, g in zip(seeds, kd, ce, closed, strict=True)
    ]
    kd_ppl, ce_ppl = _mean([r["ppl"] for r in kd]), _mean([r["ppl"] for r in ce])
    kd_beats_ce = _mean([r["bpb"] for r in kd]) < _mean([r["bpb"] for r in ce])
    return {
        "teacher_ppl": results["teacher"]["ppl"],
        "kd_student_ppl": kd_ppl,
        "ce_student_ppl": ce_ppl,
        "teacher_bpb": teacher_bpb,
        "kd_student_bpb": _mean([r["bpb"] for r in kd]),
        "ce_student_bpb": _mean([r["bpb"] for r in ce]),
        "best_ce_student_bpb": best_ce,
        "kd_gap_closed": spread["mean"],
        "kd_gap_closed_min": spread["min"],
        "kd_gap_closed_max": spread["max"],
        "kd_gap_closed_against": "best CE seed",
        "seeds": seeds,
        "per_seed": per_seed,
        "kd_student_agreement": _mean([r["agreement"] for r in kd]),
        "ce_student_agreement": _mean([r["agreement"] for r in ce]),
        "teacher_loss": results["teacher"]["loss"],
        "kd_student_loss": _mean([r["loss"] for r in kd]),
        "ce_student_loss": _mean([r["loss"] for r in ce]),
        "kd_beats_ce": kd_beats_ce,
        "verdict": (
            "KD students beat the CE-only students at equal budget"
            if kd_beats_ce
            else "KD did NOT beat the CE-only baseline on this corpus at this budget"
        ),
        "eval_method": kd[0]["method"],
        "eval_window": kd[0]["window"],
        "eval_stride": kd[0]["stride"],
        "eval_documents": results["documents"]["eval"],
        "eval_tokens": kd[0]["tokens"],
        "teacher_eval_tokens": results["teacher"]["tokens"],
        "eval_bytes": kd[0]["bytes"],
        "teacher_eval_bytes": results["teacher"]["bytes"],
    }


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
    ax.set_title("sakd demo: tiny-moe teacher -> tiny-dense student (seed 0)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def demo_line(summary: dict[str, Any]) -> str:
    """The demo's one-line verdict: bits per byte and the share of the gap KD closed, with its spread."""
    n = len(summary["seeds"])
    closed = summary["kd_gap_closed"]
    share = (
        "KD closed no measurable gap (the CE students match the teacher)"
        if closed is None
        else f"KD closed {closed:.1%} of the best CE student's gap to the teacher "
        f"(min {summary['kd_gap_closed_min']:.1%}, max {summary['kd_gap_closed_max']:.1%} over {n} seeds)"
    )
    return (
        f"sakd demo: {summary['verdict']}; {share}. Held-out bits per byte: teacher "
        f"{summary['teacher_bpb']:.3f}, KD students {summary['kd_student_bpb']:.3f}, CE students "
        f"{summary['ce_student_bpb']:.3f} (best {summary['best_ce_student_bpb']:.3f}); "
        f"{summary['total_seconds']:.0f} s; student at {summary['student_dir']}"
    )
