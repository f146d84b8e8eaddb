"""Off-policy KD vs on-policy (lambda = 1) vs mixed (lambda = 0.5) vs sequence-level KD at an equal wall-clock
budget, several seeds, on real text (issue 16; numbers in BENCHMARKS.md).

    python benchmarks/on_policy.py --corpus kjv.jsonl --out runs/bench_on_policy

The corpus is the King James Bible, one chapter per document (``--corpus`` a .jsonl with a ``text`` field or
a .txt with one document per line; without it, the chapters from Debian's ``bible`` program (``apt-get install
bible-kjv``) when installed, else the demo's synthetic corpus); the train and held-out files hold one document a
line, read with ``data.sample_by: line``. Every 20th
chapter is held out. Two byte-level BPE tokenizers are trained on the training chapters (student 1,024 tokens,
teacher 2,048: the cross-tokenizer path, as in the demo), the demo's ``tiny-moe`` teacher is pretrained by
sakd on them (``benchmarks/bench_teacher.py``, cached under ``$SAKD_CACHE_DIR``), and the ``tiny-dense``
student is distilled four ways with everything else equal (loss ``fkl``, T = 1, alpha = 0.5 on data steps;
prompts are the first 32 tokens of the step's blocks; 64 new tokens at T = 1):

==========  ===========================================================================================
off         off-policy KD on the blocks (``distillation.policy: off``)
on          the student's samples scored by the teacher (``on``; alpha = 1 on those steps)
mixed       half the steps on the student's samples (``mixed``, ``generation.fraction: 0.5``)
sequence    the teacher's samples with CE (``sequence``, ``sequence_loss: ce``; Kim & Rush 2016)
==========  ===========================================================================================

Equal wall clock: a short pilot run of each method measures its seconds per optimizer step; every run then
gets ``max_steps = budget / (s/step)``. Reported per method (mean ± sample standard deviation over seeds):
held-out bits per byte of the student (its own tokens; EOS targets excluded, bytes of the UTF-8 text its
scored tokens spell), the teacher's NLL per student token and bits per byte on the student's greedy and
sampled continuations of 32 held-out prompts (``student_continuations`` of the run summary), steps, seconds,
trained (loss) tokens per second and generated tokens per second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sakd.align.token_bytes import token_table  # noqa: E402
from sakd.commands.demo import train_tokenizer  # noqa: E402
from sakd.config import load_config  # noqa: E402
from sakd.data import prepare_data  # noqa: E402
from sakd.models import load_tokenizer  # noqa: E402
from sakd.training.trainer import Distiller  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_teacher import pretrained_teacher  # noqa: E402

METHODS: dict[str, dict[str, Any]] = {
    "off": {"policy": "off"},
    "on": {"policy": "on"},
    "mixed": {"policy": "mixed", "generation": {"fraction": 0.5}},
    "sequence": {"policy": "sequence", "generation": {"sequence_loss": "ce"}},
}
BUDGET = {"block_size": 128, "batch_size": 16, "teacher_steps": 1200, "vocab": 1024, "teacher_vocab": 2048}
GENERATION = {"prompt_tokens": 32, "max_new_tokens": 64, "temperature": 1.0, "eval_prompts": 32}


def _kjv_chapters() -> list[str]:
    """The 1,189 chapters from Debian's ``bible -f`` (one verse a line, "Ge1:1 In the beginning ...")."""
    out = subprocess.run(
        ["bible", "-f", "Genesis 1:1-Revelation 22:21"], check=True, capture_output=True, text=True
    )
    chapters: dict[str, list[str]] = {}
    for line in filter(str.strip, out.stdout.splitlines()):
        ref, text = line.split(" ", 1)
        chapters.setdefault(ref.split(":")[0], []).append(" ".join(text.split()))
    return [" ".join(v) for v in chapters.values()]


def documents(corpus: str | None) -> tuple[list[str], str]:
    """The corpus as documents, and its name."""
    if corpus is not None:
        path = Path(corpus)
        if not path.is_file():
            raise SystemExit(f"--corpus {corpus}: no such file; pass a .jsonl (text field) or a .txt")
        if path.suffix == ".jsonl":
            return [json.loads(x)["text"] for x in path.read_text().splitlines() if x.strip()], path.name
        return [x for x in path.read_text().splitlines() if x.strip()], path.name
    if shutil.which("bible"):
        return _kjv_chapters(), "KJV (bible -f)"
    from sakd.data.synthetic import write_corpus

    tmp = write_corpus(Path(os.environ.get("TMPDIR", "/tmp")) / "sakd-bench-corpus.txt", num_docs=6000)
    return [x for x in tmp.read_text().splitlines() if x.strip()], "demo synthetic corpus"


def prepare(out: Path, corpus: str | None) -> dict[str, Any]:
    """Train/held-out files (every 20th document held out), both tokenizers, the pretrained teacher."""
    docs, name = documents(corpus)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = out / "train.txt", out / "heldout.txt"
    train.write_text("\n".join(d for i, d in enumerate(docs) if i % 20) + "\n")
    heldout.write_text("\n".join(d for i, d in enumerate(docs) if i % 20 == 0) + "\n")
    tok = train_tokenizer(train, out / "student_tokenizer", BUDGET["vocab"])
    teacher_tok = train_tokenizer(train, out / "teacher_tokenizer", BUDGET["teacher_vocab"])
    t0 = time.perf_counter()
    teacher = pretrained_teacher(train, teacher_tok, "on-policy", dict(BUDGET), "line")
    return {
        "corpus": name,
        "documents": len(docs),
        "train": str(train),
        "heldout": str(heldout),
        "tokenizer": str(tok),
        "teacher_tokenizer": str(teacher_tok),
        "teacher": str(teacher),
        "teacher_seconds": round(time.perf_counter() - t0, 1),
    }


def recipe(setup: dict[str, Any], method: str, seed: int, steps: int, out: Path) -> dict[str, Any]:
    spec = METHODS[method]
    return {
        "model": {
            "teacher": setup["teacher"],
            "student": "tiny-dense",
            "tokenizer": setup["tokenizer"],
            "teacher_tokenizer": setup["teacher_tokenizer"],
        },
        "data": {
            "train": setup["train"],
            "eval": setup["heldout"],
            "sample_by": "line",
            "block_size": BUDGET["block_size"],
            "max_eval_blocks": 128,
        },
        "distillation": {
            "loss": {"kind": "fkl", "alpha": 0.5, "temperature": 1.0, "chunk_size": 1024},
            "policy": spec["policy"],
            "generation": {**GENERATION, **spec.get("generation", {})},
        },
        "optimization": {"learning_rate": 3e-3, "warmup_steps": 20, "weight_decay": 0.0},
        "training": {
            "output_dir": str(out),
            "batch_size": BUDGET["batch_size"],
            "max_steps": steps,
            "eval_every": 0,
            "seed": seed,
        },
        "logging": {"log_every": 10, "progress_bar": False},
    }


def train(raw: dict[str, Any]) -> dict[str, Any]:
    cfg, _ = load_config(raw)
    return Distiller(cfg, resume="none", overwrite=True).train()


def _heldout_data(setup: dict[str, Any]) -> dict[str, Any]:
    """The held-out chapters (one a line) as the data section that packs them into blocks."""
    return {
        "train": setup["heldout"],
        "eval": setup["heldout"],
        "sample_by": "line",
        "block_size": BUDGET["block_size"],
    }


@torch.no_grad()
def heldout_bpb(model_dir: str, setup: dict[str, Any], tokenizer_dir: str) -> float:
    """Bits per byte of ``model_dir`` on the held-out blocks packed with its tokenizer: the summed NLL of
    every scored next token (EOS targets excluded) over the UTF-8 bytes those tokens spell."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(tokenizer_dir)
    cfg, _ = load_config({"data": _heldout_data(setup)})
    blocks = prepare_data(cfg.data, tok, 0).eval
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    table = token_table(tok)
    nbytes = torch.tensor([len(b) if b is not None else 0 for b in table.data], dtype=torch.float64)
    nats = total = 0.0
    for lo in range(0, len(blocks), 16):
        ids = torch.as_tensor(blocks[lo : lo + 16]["input_ids"])
        logp = torch.log_softmax(model(ids).logits[:, :-1, : len(tok)].double(), -1)
        target = ids[:, 1:]
        keep = target != tok.eos_token_id
        nats -= float(logp.gather(-1, target[..., None]).squeeze(-1)[keep].sum())
        total += float(nbytes[target][keep].sum())
    return nats / math.log(2) / total


def pilot_steps(setup: dict[str, Any], method: str, seed: int, budget_s: float, out: Path) -> int:
    """The optimizer steps ``method`` fits in ``budget_s`` training seconds, from a 12-step pilot run."""
    pilot = train(recipe(setup, method, seed, 12, out / f"{method}-pilot"))
    shutil.rmtree(out / f"{method}-pilot" / "checkpoints", ignore_errors=True)
    return max(20, int(budget_s / (pilot["train_seconds"] / pilot["steps"])))


def run_one(setup: dict[str, Any], method: str, seed: int, steps: int, out: Path) -> dict[str, Any]:
    run = out / f"{method}-seed{seed}"
    summary = train(recipe(setup, method, seed, steps, run))
    cont = summary["student_continuations"]
    result = {
        "method": method,
        "seed": seed,
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "loss_tokens_per_s": summary["tokens_seen"] / summary["train_seconds"],
        "generated_tokens": summary.get("generated_tokens", 0),
        "generation_seconds": summary.get("generation_seconds", 0.0),
        "heldout_bpb": heldout_bpb(summary["final_dir"], setup, setup["tokenizer"]),
        "eval_ppl": summary["eval_ppl"],
        "greedy_teacher_nll": cont["greedy"]["teacher_nll"],
        "greedy_teacher_bpb": cont["greedy"]["teacher_bpb"],
        "greedy_tokens": cont["greedy"]["tokens"],
        "sampled_teacher_nll": cont["sampled"]["teacher_nll"],
        "sampled_teacher_bpb": cont["sampled"]["teacher_bpb"],
        "gen_tokens_per_s": summary.get("generated_tokens", 0)
        / max(summary.get("generation_seconds", 0), 1e-9),
        "gen_share": summary.get("generation_seconds", 0.0) / summary["train_seconds"],
        "seconds_per_step": summary["train_seconds"] / summary["steps"],
    }
    print(json.dumps(result), flush=True)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return result


def teacher_reference(setup: dict[str, Any]) -> dict[str, float]:
    """The teacher scoring its own continuations of the held-out prompts (in its own tokens): the floor the
    students' ``teacher_bpb`` is read against."""
    from transformers import AutoModelForCausalLM

    from sakd.policy import ContinuationSpec, heldout_prompts, score_continuations

    tok = load_tokenizer(setup["teacher_tokenizer"])
    cfg, _ = load_config({"data": _heldout_data(setup)})
    blocks = prepare_data(cfg.data, tok, 0).eval
    spec = ContinuationSpec(
        heldout_prompts(blocks["input_ids"], GENERATION["eval_prompts"], GENERATION["prompt_tokens"]),
        max_new_tokens=GENERATION["max_new_tokens"],
        temperature=GENERATION["temperature"],
        batch_size=BUDGET["batch_size"],
    )
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"]).eval()
    return score_continuations(teacher, teacher, spec, student_tokenizer=tok)


def _mean_sd(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    cols = [
        ("heldout_bpb", "held-out bits/byte", 3),
        ("greedy_teacher_nll", "teacher NLL on greedy (nats/token)", 3),
        ("sampled_teacher_nll", "teacher NLL on samples (nats/token)", 3),
        ("greedy_tokens", "greedy length", 1),
        ("steps", "steps", 0),
        ("seconds_per_step", "s/step", 3),
        ("loss_tokens_per_s", "trained tok/s", 0),
        ("gen_tokens_per_s", "generated tok/s", 0),
        ("gen_share", "share of time generating", 2),
    ]
    lines = ["| method | " + " | ".join(c for _, c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if rows:
            cells = [_mean_sd([float(r[k]) for r in rows], d) for k, _, d in cols]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_on_policy"))
    p.add_argument("--corpus", help="a .jsonl (text field) or .txt (one document per line); default: KJV")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per run (default 120)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--teacher-steps", type=int, default=BUDGET["teacher_steps"], help="teacher pretraining steps"
    )
    args = p.parse_args()
    BUDGET["teacher_steps"] = args.teacher_steps
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    setup = prepare(args.out, args.corpus)
    setup["teacher_heldout_bpb"] = heldout_bpb(setup["teacher"], setup, setup["teacher_tokenizer"])
    setup["teacher_own_continuations"] = teacher_reference(setup)
    print(json.dumps(setup), flush=True)
    steps = {m: pilot_steps(setup, m, args.seeds[0], args.budget, args.out) for m in args.methods}
    print(json.dumps({"steps": steps}), flush=True)
    results: list[dict[str, Any]] = []
    # Seed-major, and the report rewritten after every run: a run cut short leaves every method with the
    # same number of seeds.
    for seed in args.seeds:
        for method in args.methods:
            results.append(run_one(setup, method, seed, steps[method], args.out))
            report = {
                "setup": setup,
                "budget_seconds": args.budget,
                "steps": steps,
                "seeds": args.seeds,
                "threads": args.threads,
                "results": results,
                "table": table(results),
                "total_seconds": round(time.perf_counter() - t0, 1),
                "torch": torch.__version__,
            }
            (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print(report["table"])


if __name__ == "__main__":
    main()
