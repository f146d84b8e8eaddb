"""The demo's numbers: held-out scoring of the teacher and every student, the share of the CE student's gap
to the teacher that KD closed (against the CE seed chosen on validation, per seed against its own CE twin, and
against the CE mean), and the loss-curve PNG."""

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


def _scoring(cfg: Any) -> dict[str, int]:
    """How the demo scores held-out text: strided windows of one block, batches of 16."""
    window = cfg.data.block_size
    return {"batch_size": 16, "window": window, "stride": window // EVAL_STRIDE_FRACTION}


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
    scoring = _scoring(cfg)
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


def score_bpb(raw: dict[str, Any], students: dict[str, str]) -> dict[str, float]:
    """Each student's bits per byte on ``raw``'s ``data.eval`` documents, scored as :func:`evaluate_all` does."""
    cfg, _ = load_config(raw)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    stream = text_stream(load_text_dataset(cfg.data.eval), tokenizer)
    return {
        name: evaluate(AutoModelForCausalLM.from_pretrained(model_dir).eval(), stream, **_scoring(cfg))["bpb"]
        for name, model_dir in students.items()
    }


def gap_shares(teacher: float, kd: list[float], ce: list[float], ce_choice: list[float]) -> dict[str, Any]:
    """The share of the CE student's gap to the teacher that KD closed (bits per byte; entry i of ``kd`` and
    ``ce`` is seed i's KD student and its CE twin, same initialisation and data order), three ways:

    * ``against_reference``: each KD seed against the reference CE seed, the one with the lowest
      ``ce_choice`` (its bits per byte on the documents the demo chooses on -- never the reported ones),
      with their mean, min and max;
    * ``paired``: each KD seed against its own CE twin (CE's seed spread included);
    * ``against_mean``: the mean KD student against the mean CE student.
    """
    ref = min(range(len(ce)), key=ce_choice.__getitem__)
    against = [gap_closed(teacher, k, ce[ref]) for k in kd]
    return {
        "reference": ref,
        "reference_bpb": ce[ref],
        "against_reference": against,
        **_spread(against),
        "paired": [gap_closed(teacher, k, c) for k, c in zip(kd, ce, strict=True)],
        "against_mean": gap_closed(teacher, _mean(kd), _mean(ce)),
    }


def quality(results: dict[str, dict[str, Any]], seeds: list[int], ce_choice: list[float]) -> dict[str, Any]:
    """The summary's figures (on the scored documents), means over the student seeds. ``kd_gap_closed`` (with
    ``_min``/``_max``) is measured against the CE seed with the lowest ``ce_choice`` -- the CE students' bits
    per byte on the validation documents, in ``seeds`` order -- and ``kd_gap_closed_paired`` /
    ``kd_gap_closed_vs_ce_mean`` give the shares against each seed's own CE twin and the CE mean
    (:func:`gap_shares`). The verdict ``kd_beats_ce`` compares the mean bits per byte."""
    teacher_bpb = results["teacher"]["bpb"]
    kd = [results[f"kd_seed{s}"] for s in seeds]
    ce = [results[f"ce_seed{s}"] for s in seeds]
    kd_bpb, ce_bpb = [r["bpb"] for r in kd], [r["bpb"] for r in ce]
    shares = gap_shares(teacher_bpb, kd_bpb, ce_bpb, ce_choice)
    per_seed = [
        {
            "seed": s,
            "kd_student_bpb": k["bpb"],
            "ce_student_bpb": c["bpb"],
            "ce_student_validation_bpb": v,
            "kd_student_ppl": k["ppl"],
            "ce_student_ppl": c["ppl"],
            "kd_gap_closed": g,
            "kd_gap_closed_vs_same_seed_ce": p,
            "kd_student_agreement": k["agreement"],
            "ce_student_agreement": c["agreement"],
        }
        for s, k, c, v, g, p in zip(
            seeds, kd, ce, ce_choice, shares["against_reference"], shares["paired"], strict=True
        )
    ]
    kd_beats_ce = _mean(kd_bpb) < _mean(ce_bpb)
    return {
        "teacher_ppl": results["teacher"]["ppl"],
        "kd_student_ppl": _mean([r["ppl"] for r in kd]),
        "ce_student_ppl": _mean([r["ppl"] for r in ce]),
        "teacher_bpb": teacher_bpb,
        "kd_student_bpb": _mean(kd_bpb),
        "ce_student_bpb": _mean(ce_bpb),
        "ce_reference_seed": seeds[shares["reference"]],
        "ce_reference_student_bpb": shares["reference_bpb"],
        "kd_gap_closed": shares["mean"],
        "kd_gap_closed_min": shares["min"],
        "kd_gap_closed_max": shares["max"],
        "kd_gap_closed_against": "the CE seed with the lowest validation bits per byte",
        "kd_gap_closed_paired": shares["paired"],
        "kd_gap_closed_vs_ce_mean": shares["against_mean"],
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


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.1%}"


def demo_line(summary: dict[str, Any]) -> str:
    """The demo's verdict in two lines: the bits per byte, then the share of the CE student's gap to the
    teacher that KD closed -- against the CE seed chosen on validation (mean, min and max over the KD seeds),
    per seed against its own CE twin, and against the CE students' mean."""
    n = len(summary["seeds"])
    scored = "Held-out" if summary["scored_on"] == "heldout" else "Validation"
    head = (
        f"sakd demo: {summary['verdict']}. {scored} bits per byte: teacher {summary['teacher_bpb']:.3f}, "
        f"KD students {summary['kd_student_bpb']:.3f}, CE students {summary['ce_student_bpb']:.3f} (means of "
        f"{n} seeds); {summary['total_seconds']:.0f} s; student at {summary['student_dir']}"
    )
    paired = ", ".join(_pct(g) for g in summary["kd_gap_closed_paired"])
    against = (
        f"CE seed {summary['ce_reference_seed']} ({summary['ce_reference_student_bpb']:.3f}; chosen as the CE "
        "seed lowest on validation)"
    )
    if summary["kd_gap_closed"] is None:
        share = f"KD closed no measurable gap: {against} matches the teacher"
    else:
        share = (
            f"KD closed {_pct(summary['kd_gap_closed'])} (min {_pct(summary['kd_gap_closed_min'])}, max "
            f"{_pct(summary['kd_gap_closed_max'])} over {n} KD seeds) of the gap to the teacher of {against}"
        )
    return (
        f"{head}\n{share}; each KD seed against its own CE twin: {paired}; against the CE students' mean: "
        f"{_pct(summary['kd_gap_closed_vs_ce_mean'])}."
    )
