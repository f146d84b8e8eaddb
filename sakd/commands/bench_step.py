"""Benchmark: one distillation step of the real-size pair against its parts.

``sakd bench step`` builds a run (:class:`sakd.training.trainer.Distiller`, presets with random init) per
case and times, on the *same* micro-batch:

- (a) the teacher's forward alone (``teacher(input_ids)``, full logits, no grad), on the teacher's tokens;
- (b) the student's forward + backward alone (``student(input_ids, labels=...)`` with Hugging Face's own
  cross-entropy, then ``backward``);
- (d) the optimizer step alone (what every training step pays besides (a) and (b));
- (c) the full KD step, :meth:`Distiller.train_step` (teacher signal, student forward, the objective,
  backward, clipping, optimizer step).

and reports tokens/s (student tokens), the peak extra memory of each part (process high-water mark during the
part minus the resident set before it, after ``malloc_trim``) and the overhead ratios ``c / (a + b)`` (the
issue's measure) and ``c / (a + b + d)`` (the step's own overhead, the optimizer being unavoidable). Each case
runs in a fresh subprocess; each part runs ``warmup`` times untimed, then ``steps`` timed rounds run the
parts in turn (interleaved: a slow spell of a shared machine hits every part alike), and the medians are
reported.

Cases: ``same`` (the teacher built with the student's tokenizer), ``cross`` (each model its own tokenizer:
aligned positions, vocabulary map, chain rule), each also ``+aux`` (a hidden-state feature loss on top).
The models need tokenizers (presets take their vocabulary size from them): ``--student-tokenizer`` and
``--teacher-tokenizer`` (BENCHMARKS.md uses the real SmolLM2 and Qwen tokenizers, 49,152 and 151,646 tokens),
by default generated ones of those sizes (:mod:`sakd.commands.bench_assets`).
``--reduced`` runs the tiny presets with tokenizers trained on the spot (a fast check that the benchmark
works; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

CASES = ("same", "cross", "same+aux", "cross+aux")


@dataclass(frozen=True)
class StepSetup:
    """What every case of one run shares."""

    student_tokenizer: str
    teacher_tokenizer: str
    data: str
    teacher: str = "huihui-moe-1.2b"
    student: str = "smollm-135m"
    batch: int = 2
    seq: int = 128
    steps: int = 5
    warmup: int = 1
    chunk_size: str = "auto"
    overrides: tuple[str, ...] = field(default_factory=tuple)


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


def _reset_peak() -> int:
    """Trim the heap, reset the high-water mark; returns the resident set (KiB) it starts from."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _rss_kib("VmRSS")


def _timed(parts: dict[str, Callable[[], Any]], setup: StepSetup) -> dict[str, dict[str, float]]:
    """Each part ``setup.warmup`` times, then ``setup.steps`` rounds of every part in turn (interleaved, so
    a slow spell of a shared machine hits all parts alike): per part the median and fastest seconds and
    the peak extra memory (MiB) of its runs."""
    for fn in parts.values():
        for _ in range(setup.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in parts}
    peaks = dict.fromkeys(parts, 0.0)
    for _ in range(setup.steps):
        for name, fn in parts.items():
            base = _reset_peak()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], (_rss_kib("VmHWM") - base) / 1024)
    return {
        name: {"seconds": statistics.median(t), "seconds_min": min(t), "peak_extra_mib": peaks[name]}
        for name, t in times.items()
    }


def _recipe(setup: StepSetup, case: str, out_dir: str) -> dict[str, Any]:
    cross, aux = case.startswith("cross"), case.endswith("+aux")
    distillation: dict[str, Any] = {
        "loss": {"alpha": 0.5, "temperature": 2.0, "chunk_size": setup.chunk_size},
    }
    if aux:
        distillation["feature"] = {"weight": 1.0}
    return {
        "model": {
            "teacher": setup.teacher,
            "student": setup.student,
            "tokenizer": setup.student_tokenizer,
            "teacher_tokenizer": setup.teacher_tokenizer if cross else setup.student_tokenizer,
        },
        "data": {"train": setup.data, "block_size": setup.seq, "max_eval_blocks": 1},
        "distillation": distillation,
        "training": {
            "output_dir": out_dir,
            "batch_size": setup.batch,
            "max_steps": 1000,
            "eval_every": 0,
            "save_every": 0,
        },
        "logging": {"progress_bar": False},
    }


def _measure_case(setup: StepSetup, case: str) -> dict[str, Any]:
    """All parts of one case, in this process (called in a fresh subprocess)."""
    import torch

    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    with tempfile.TemporaryDirectory() as out_dir:
        cfg, _ = load_config(_recipe(setup, case, out_dir), list(setup.overrides))
        build_start = time.perf_counter()
        distiller = Distiller(cfg, resume="none", overwrite=True)
        build_seconds = time.perf_counter() - build_start
        micro_batches = distiller._micro_batches()
        mb = micro_batches[0]
        teacher, student = distiller.teacher, distiller.hf_student
        t_ids = mb.get("teacher_input_ids", mb["input_ids"])
        t_mask = mb.get("teacher_attention_mask", mb["attention_mask"])

        def teacher_forward() -> None:
            with torch.no_grad():
                teacher(input_ids=t_ids, attention_mask=t_mask)

        def student_fwd_bwd() -> None:
            out = student(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"])
            out.loss.backward()
            student.zero_grad(set_to_none=True)

        def optimizer_step() -> None:
            for p in student.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            distiller.optimizer.step()
            distiller.optimizer.zero_grad(set_to_none=True)

        def kd_step() -> None:
            distiller.train_step(micro_batches)

        parts = _timed(
            {
                "teacher_forward": teacher_forward,
                "student_fwd_bwd": student_fwd_bwd,
                "optimizer_step": optimizer_step,
                "kd_step": kd_step,
            },
            setup,
        )
        tokens = int(mb["input_ids"].numel())
        a, b = parts["teacher_forward"]["seconds"], parts["student_fwd_bwd"]["seconds"]
        c, d = parts["kd_step"]["seconds"], parts["optimizer_step"]["seconds"]
        return {
            "case": case,
            "student_tokens": tokens,
            "teacher_tokens": int(t_ids.numel()),
            "student_vocab": distiller.vocab_size,
            "teacher_vocab": len(distiller.alignment.teacher_tokenizer or distiller.tokenizer),
            "chunk_size": setup.chunk_size,
            "build_seconds": build_seconds,
            "rss_after_build_mib": _rss_kib("VmRSS") / 1024,
            **{f"{k}_{m}": v[m] for k, v in parts.items() for m in v},
            **{f"{k}_tokens_per_s": tokens / v["seconds"] for k, v in parts.items()},
            "overhead_c_over_a_plus_b": c / (a + b),
            "overhead_c_over_a_plus_b_plus_d": c / (a + b + d),
        }


def _run_case(setup: StepSetup, case: str) -> dict[str, Any]:
    """:func:`_measure_case` in a fresh interpreter (its own memory high-water mark)."""
    spec = json.dumps({"setup": asdict(setup), "case": case})
    done = subprocess.run(
        [sys.executable, "-m", "sakd.commands.bench_step", "--worker", spec],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"bench step case {case} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reduced_setup(work_dir: Path) -> StepSetup:
    """Tiny presets, a generated corpus and two tokenizers trained on it: the benchmark's own check."""
    from sakd.commands.demo import train_tokenizer
    from sakd.data.synthetic import write_corpus

    corpus = write_corpus(work_dir / "corpus.txt", num_docs=120)
    student_tok = train_tokenizer(corpus, work_dir / "student_tok", 300)
    teacher_tok = train_tokenizer(corpus, work_dir / "teacher_tok", 500)
    return StepSetup(
        student_tokenizer=str(student_tok),
        teacher_tokenizer=str(teacher_tok),
        data=str(corpus),
        teacher="tiny-moe",
        student="tiny-dense",
        batch=2,
        seq=32,
        steps=1,
        warmup=1,
    )


def run(setup: StepSetup, cases: tuple[str, ...] = CASES) -> list[dict[str, Any]]:
    """One row per case (see the module docstring)."""
    return [_run_case(setup, case) for case in cases]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (seconds are medians per step)."""
    lines = [
        "| case | tokens | (a) teacher fwd s | (b) student fwd+bwd s | (d) optimizer s | (c) KD step s "
        "| KD tokens/s | c/(a+b) | c/(a+b+d) | peak extra MiB a / b / c |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['student_tokens']} | {r['teacher_forward_seconds']:.2f} "
            f"| {r['student_fwd_bwd_seconds']:.2f} | {r['optimizer_step_seconds']:.2f} "
            f"| {r['kd_step_seconds']:.2f} | {r['kd_step_tokens_per_s']:.1f} "
            f"| {r['overhead_c_over_a_plus_b']:.2f} | {r['overhead_c_over_a_plus_b_plus_d']:.2f} "
            f"| {r['teacher_forward_peak_extra_mib']:.0f} / {r['student_fwd_bwd_peak_extra_mib']:.0f} "
            f"/ {r['kd_step_peak_extra_mib']:.0f} |"
        )
    return "\n".join(lines)


def _full_setup(args: argparse.Namespace, work: Path) -> StepSetup:
    """The real-size presets with the given tokenizers, or generated ones of the real sizes
    (:mod:`sakd.commands.bench_assets`)."""
    from sakd.commands.bench_assets import QWEN_VOCAB, SMOLLM_VOCAB, sized_tokenizer
    from sakd.data.synthetic import write_corpus

    data = args.data or str(write_corpus(work / "corpus.txt", num_docs=400))
    s_tok = args.student_tokenizer or str(sized_tokenizer(Path(data), work / "student_tok", SMOLLM_VOCAB))
    t_tok = args.teacher_tokenizer or str(
        sized_tokenizer(Path(data), work / "teacher_tok", QWEN_VOCAB, trained=3000)
    )
    return StepSetup(s_tok, t_tok, data, args.teacher, args.student)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``sakd bench step [--student-tokenizer DIR --teacher-tokenizer DIR --data FILE]``."""
    parser = argparse.ArgumentParser(prog="sakd bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--student-tokenizer", help="default: a generated one of 49,152 tokens")
    parser.add_argument(
        "--teacher-tokenizer", help="for the cross cases; default: a generated one of 151,646 tokens"
    )
    parser.add_argument("--data", help="training text (.txt/.jsonl); default: a generated corpus")
    parser.add_argument("--teacher", default="huihui-moe-1.2b")
    parser.add_argument("--student", default="smollm-135m")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="student tokens per block")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds over the parts")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk-size", default="auto", help="distillation.loss.chunk_size")
    parser.add_argument("--reduced", action="store_true", help="tiny models: checks the benchmark runs")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        setup = StepSetup(**{**spec["setup"], "overrides": tuple(spec["setup"]["overrides"])})
        print(json.dumps(_measure_case(setup, spec["case"])))
        return
    with tempfile.TemporaryDirectory() as work:
        if args.reduced:
            setup = reduced_setup(Path(work))
        else:
            setup = _full_setup(args, Path(work))
        setup = replace(
            setup,
            batch=args.batch if not args.reduced else setup.batch,
            seq=args.seq if not args.reduced else setup.seq,
            steps=args.steps if not args.reduced else setup.steps,
            warmup=args.warmup if not args.reduced else setup.warmup,
            chunk_size=args.chunk_size,
            overrides=tuple(args.overrides),
        )
        rows = run(setup, tuple(args.cases))
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(to_markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": asdict(setup), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
