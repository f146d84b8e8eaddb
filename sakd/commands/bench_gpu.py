"""The GPU check: the real-size pair (random init, across tokenizers) on one GPU, in one run, one JSON file.

``sakd bench gpu`` (or ``launch/gpu_check.sh``) takes the shipped recipe of the pair
(``sakd/recipes/huihui-moe-1b-to-smollm-135m.yaml``: micro-batch 4 x 384 tokens, 8 accumulated) with the
presets of both models in place of the hub ids, and runs a fixed list of variants (:data:`VARIANTS`), each
in a fresh process (its own CUDA context, memory cap and peak counters), a few optimizer steps each:

- ``p100_fp16_16gb``: the settings of ``launch/p100.sh`` (fp16 mixed precision with loss scaling, fp16
  teacher, 8-bit AdamW, gradient checkpointing, the recipe's micro-batch) under a 16 GB cap
  (``torch.cuda.set_per_process_memory_fraction``): whether it fits, the peak against ``sakd plan``'s
  estimate of the same setup, tokens/s;
- ``bf16``: bf16 tokens/s and MFU = tokens/s x (2·N_teacher_active + 6·N_student) / the GPU's peak
  dense bf16 FLOP/s (N counts every parameter a token uses, the output heads included);
- ``bf16_adamw_8bit`` / ``bf16_paged_adamw_8bit``: bitsandbytes' 8-bit optimizers;
- ``bf16_teacher_8bit`` / ``bf16_teacher_4bit``: a bitsandbytes-quantized teacher;
- ``bf16_compile``: ``bf16`` with both models' decoders under ``torch.compile`` (last: the slowest to start).

A variant that fails records its error and the run goes on; the JSON is rewritten after every variant, so
a run stopped by its time budget (``--budget``, default 450 s) still leaves the finished ones. Tokenizers:
``--student-tokenizer`` / ``--teacher-tokenizer``, or by default tokenizers of the real sizes generated on
the spot (:mod:`sakd.commands.bench_assets`). ``--reduced`` runs tiny presets on whatever device there is
and skips what needs CUDA: the check of the check that CI runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3

BF16 = {"mixed_precision": "bf16", "teacher_dtype": "bfloat16"}
VARIANTS: dict[str, dict[str, Any]] = {
    "p100_fp16_16gb": {
        "mixed_precision": "fp16",
        "teacher_dtype": "float16",
        "optimizer": "adamw_8bit",
        "gradient_checkpointing": True,
        "cap_gib": 16,
    },
    "bf16": BF16,
    "bf16_adamw_8bit": {**BF16, "optimizer": "adamw_8bit"},
    "bf16_paged_adamw_8bit": {**BF16, "optimizer": "paged_adamw_8bit"},
    "bf16_teacher_8bit": {**BF16, "teacher_quantization": "8bit"},
    "bf16_teacher_4bit": {**BF16, "teacher_quantization": "4bit"},
    "bf16_compile": {**BF16, "compile": True},  # last: compiling takes the longest
}
REDUCED_VARIANTS = {"fp32": {}, "fp32_adamw_8bit": {"optimizer": "adamw_8bit"}}
"""What ``--reduced`` runs on a CPU (the CUDA variants are listed as skipped)."""

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
"""Dense bf16 tensor-core peaks (vendor data sheets; the SXM parts). A GPU not listed (or without bf16:
P100, V100, T4) gets no MFU unless ``--peak-tflops`` is given."""


RECIPE = "sakd/recipes/huihui-moe-1b-to-smollm-135m.yaml"


@dataclass(frozen=True)
class GpuSetup:
    """What every variant of one run shares: the recipe and what replaces its hub models and data."""

    student_tokenizer: str
    teacher_tokenizer: str
    data: str
    teacher: str = "huihui-moe-1.2b"
    student: str = "smollm-135m"
    steps: int = 3
    warmup: int = 2
    reduced: bool = False
    recipe: str = RECIPE
    overrides: tuple[str, ...] = ()


def _overrides(setup: GpuSetup, variant: dict[str, Any], out_dir: str) -> list[str]:
    return [
        f"model.teacher={setup.teacher}",
        f"model.student={setup.student}",
        f"model.tokenizer={setup.student_tokenizer}",
        f"model.teacher_tokenizer={setup.teacher_tokenizer}",
        f"model.teacher_dtype={variant.get('teacher_dtype', 'float32')}",
        f"model.teacher_quantization={variant.get('teacher_quantization', 'none')}",
        f"model.gradient_checkpointing={variant.get('gradient_checkpointing', False)}",
        f"data.train={setup.data}",
        "data.dataset_config=null",
        "data.max_eval_blocks=1",
        f"optimization.optimizer={variant.get('optimizer', 'adamw')}",
        f"training.output_dir={out_dir}",
        "training.max_steps=1000",
        "training.eval_every=0",
        "training.save_every=0",
        f"training.mixed_precision={variant.get('mixed_precision', 'no')}",
        "logging.progress_bar=false",
        *setup.overrides,
    ]


def _peak_tflops(override: float | None) -> float | None:
    import torch

    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _planned_bytes(distiller: Any, variant: dict[str, Any], setup: GpuSetup) -> int:
    """``sakd plan``'s estimate of this setup (one GPU, no ZeRO)."""
    from sakd.planner.estimate import Setup, Workload, estimate
    from sakd.planner.sizes import model_numbers

    student = model_numbers(setup.student, distiller.vocab_size)
    teacher = model_numbers(setup.teacher, len(distiller.alignment.teacher_tokenizer or distiller.tokenizer))
    plan = Setup(
        stage=0,
        optimizer="adamw_8bit" if "8bit" in variant.get("optimizer", "") else "adamw",
        gradient_checkpointing=variant.get("gradient_checkpointing", False),
        micro_batch=distiller.cfg.training.batch_size,
    )
    return estimate(
        student, teacher, plan, Workload.from_config(distiller.cfg, 1, distiller.alignment.differ)
    ).total


def measure_variant(
    setup: GpuSetup, name: str, variant: dict[str, Any], peak_tflops: float | None
) -> dict[str, Any]:
    """Build the run, take ``warmup`` + ``steps`` KD steps, report speed and memory (in this process)."""
    import torch

    from sakd.config import load_config
    from sakd.planner.sizes import model_numbers
    from sakd.training.trainer import Distiller

    cuda = torch.cuda.is_available()
    row: dict[str, Any] = {"variant": name, **{k: v for k, v in variant.items()}}
    if "cap_gib" in variant and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, variant["cap_gib"] * GIB / total))
    with tempfile.TemporaryDirectory() as out_dir:
        cfg, _ = load_config(setup.recipe, _overrides(setup, variant, out_dir))
        start = time.perf_counter()
        try:
            distiller = Distiller(cfg, resume="none", overwrite=True)
            row["build_seconds"] = round(time.perf_counter() - start, 1)
            if variant.get("compile"):
                distiller.hf_student.model.compile()
                distiller.teacher.model.compile()
            batches = distiller._micro_batches()
            tokens = sum(int(mb["input_ids"].numel()) for mb in batches)
            for _ in range(setup.warmup):
                distiller.train_step(batches)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(setup.steps):
                distiller.train_step(batches)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        except torch.OutOfMemoryError as e:
            return {**row, "fits": False, "error": str(e).splitlines()[0]}
        row.update(fits=True, tokens_per_step=tokens, tokens_per_s=round(setup.steps * tokens / seconds, 1))
        row["planned_gib"] = round(_planned_bytes(distiller, variant, setup) / GIB, 3)
        if cuda:
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
            row["peak_over_planned"] = round(row["peak_reserved_gib"] / row["planned_gib"], 3)
        teacher_tok = distiller.alignment.teacher_tokenizer or distiller.tokenizer
        flops = 2 * model_numbers(setup.teacher, len(teacher_tok)).active_params
        flops += 6 * model_numbers(setup.student, distiller.vocab_size).total_params
        row["flops_per_token"] = flops
        if peak_tflops and variant.get("mixed_precision") == "bf16":
            row["mfu"] = round(row["tokens_per_s"] * flops / (peak_tflops * 1e12), 4)
    return row


def _skip_reason(variant: dict[str, Any], cuda: bool) -> str | None:
    if cuda:
        return None
    if variant.get("mixed_precision", "no") != "no" or variant.get("teacher_quantization", "none") != "none":
        return "needs CUDA"
    if variant.get("optimizer") == "paged_adamw_8bit" or "cap_gib" in variant or variant.get("compile"):
        return "needs CUDA"
    return None


def _in_subprocess(
    setup: GpuSetup, name: str, variant: dict[str, Any], peak: float | None, timeout: float
) -> dict:
    spec = json.dumps({"setup": asdict(setup), "name": name, "variant": variant, "peak": peak})
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sakd.commands.bench_gpu", "--worker", spec],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"did not finish within {timeout:.0f} s"}
    if done.returncode != 0:
        return {"variant": name, "error": " | ".join(done.stderr.strip().splitlines()[-3:]) or "?"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(setup: GpuSetup, output: Path, *, budget: float, peak_tflops: float | None = None) -> dict[str, Any]:
    """All variants, one after another; writes ``output`` after each one and returns the report."""
    import torch

    cuda = torch.cuda.is_available()
    variants = {**REDUCED_VARIANTS, **VARIANTS} if setup.reduced else VARIANTS
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "mode": "reduced" if setup.reduced else "full",
        "setup": asdict(setup),
        "variants": [],
    }
    start = time.perf_counter()
    for name, variant in variants.items():
        reason = _skip_reason(variant, cuda) or (
            "reduced mode" if setup.reduced and name in VARIANTS and not cuda else None
        )
        left = budget - (time.perf_counter() - start)
        if reason is None and left < 30:
            reason = f"time budget of {budget:.0f} s spent"
        if reason:
            row = {"variant": name, "skipped": reason}
        elif cuda:
            row = _in_subprocess(setup, name, variant, _peak_tflops(peak_tflops), left)
        else:
            row = measure_variant(setup, name, variant, None)
        report["variants"].append(row)
        report["seconds"] = round(time.perf_counter() - start, 1)
        output.write_text(json.dumps(report, indent=1))
    return report


def _default_setup(args: argparse.Namespace, work: Path) -> GpuSetup:
    from sakd.commands.bench_assets import QWEN_VOCAB, SMOLLM_VOCAB, sized_tokenizer
    from sakd.commands.demo import train_tokenizer
    from sakd.data.synthetic import write_corpus

    work.mkdir(parents=True, exist_ok=True)
    corpus = args.data or str(write_corpus(work / "corpus.txt", num_docs=120 if args.reduced else 600))
    if args.reduced:
        s_tok = args.student_tokenizer or str(train_tokenizer(Path(corpus), work / "student_tok", 300))
        t_tok = args.teacher_tokenizer or str(train_tokenizer(Path(corpus), work / "teacher_tok", 500))
        small = ("data.block_size=32", "training.batch_size=2", "training.gradient_accumulation_steps=2")
        return GpuSetup(s_tok, t_tok, corpus, "tiny-moe", "tiny-dense", 1, 1, True, args.recipe, small)
    s_tok = args.student_tokenizer or str(sized_tokenizer(Path(corpus), work / "student_tok", SMOLLM_VOCAB))
    # the teacher learns longer tokens than the student, as Qwen's 151k vocabulary does against SmolLM's
    t_tok = args.teacher_tokenizer or str(
        sized_tokenizer(Path(corpus), work / "teacher_tok", QWEN_VOCAB, trained=3000)
    )
    return GpuSetup(s_tok, t_tok, corpus, recipe=args.recipe)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``sakd bench gpu [--output gpu_check.json] [--reduced]``."""
    parser = argparse.ArgumentParser(prog="sakd bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="gpu_check.json", help="the JSON report (rewritten per variant)")
    parser.add_argument("--student-tokenizer", help="default: a generated one of SmolLM's size (49,152)")
    parser.add_argument("--teacher-tokenizer", help="default: a generated one of Qwen's size (151,646)")
    parser.add_argument("--data", help="training text; default: a generated corpus")
    parser.add_argument("--recipe", default=RECIPE, help=f"the recipe whose settings are measured ({RECIPE})")
    parser.add_argument(
        "--work-dir", help="where generated corpus and tokenizers are kept (default: temporary)"
    )
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all variants (default 450)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--reduced", action="store_true", help="tiny models, CUDA variants skipped on a CPU")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        setup = GpuSetup(**{**spec["setup"], "overrides": tuple(spec["setup"]["overrides"])})
        print(json.dumps(measure_variant(setup, spec["name"], spec["variant"], spec["peak"])))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        setup = _default_setup(args, Path(args.work_dir or tmp))
        report = run(setup, Path(args.output), budget=args.budget, peak_tflops=args.peak_tflops)
    for row in report["variants"]:
        print(json.dumps(row))
    print(f"wrote {args.output} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
