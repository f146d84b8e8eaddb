"""The benchmarks' ``tiny-moe`` teacher: pretrained by sakd on one training file, cached for later runs.

The recipe the on-policy and single-pass ablation numbers in BENCHMARKS.md were measured with (the demo's
``prepare_teacher`` before the demo got its own splits, 2026-12): the teacher's own tokenizer, FKL with
alpha = 0 (plain CE), learning rate 2e-3 with 20 warm-up steps and a cosine schedule, no weight decay,
``budget["batch_size"]`` blocks of ``budget["block_size"]`` tokens, seed 0, and no separate evaluation file
(sakd holds out ``data.eval_fraction`` of the training documents). The demo's ``prepare_teacher`` now takes
its four splits and its own budget; this keeps the benchmarks' teacher as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import sakd
from sakd.commands.demo_data import cache_root, file_hash
from sakd.config import load_config
from sakd.data.tokenize import DATA_FORMAT_VERSION
from sakd.training import checkpoint
from sakd.training.stop_signals import TrainingStopped
from sakd.training.trainer import Distiller


def teacher_recipe(out: Path, train: Path, tokenizer: Path, budget: dict[str, Any], sample_by: str) -> dict:
    """The teacher's pretraining run: ``tiny-moe`` trained on ``train`` with CE only."""
    steps = budget["teacher_steps"]
    return {
        "model": {"teacher": "tiny-moe", "student": "tiny-moe", "tokenizer": str(tokenizer)},
        "data": {
            "train": str(train),
            "sample_by": sample_by,
            "block_size": budget["block_size"],
            "max_eval_blocks": 128,
        },
        "distillation": {"loss": {"kind": "fkl", "alpha": 0.0, "temperature": 1.0, "chunk_size": 1024}},
        "optimization": {
            "learning_rate": 2e-3,
            "warmup_steps": min(20, steps),  # 20 at every budget the benchmarks use; a smoke run has fewer
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


def pretrained_teacher(
    train: Path, tokenizer: Path, name: str, budget: dict[str, Any], sample_by: str = "line"
) -> Path:
    """The teacher's directory: pretrained once, then reused from ``$SAKD_CACHE_DIR/bench-teacher``.

    The cache key is ``name`` plus everything that shapes the teacher (the training file's and the
    tokenizer's contents, steps, batch, sample_by, data format, sakd version), so a changed corpus never
    reuses a stale teacher. A stop signal keeps the run's checkpoint (the next call resumes it); any other
    failure removes the half-trained run.
    """
    key = (
        f"{name}-{file_hash(Path(train))}-{file_hash(Path(tokenizer) / 'tokenizer.json')}"
        f"-s{budget['teacher_steps']}-b{budget['block_size']}x{budget['batch_size']}-{sample_by}"
        f"-d{DATA_FORMAT_VERSION}-sakd{sakd.__version__}"
    )
    cached = cache_root() / "bench-teacher" / key
    if (cached / "model.safetensors").is_file():
        print(f"[bench] reusing cached teacher {cached}", flush=True)
        return cached
    work = cached.with_name(key + ".run")
    resume = checkpoint.latest(work / "checkpoints") is not None
    print(f"[bench] {'resuming' if resume else 'pretraining'} the tiny-moe teacher -> {cached}", flush=True)
    cfg, _ = load_config(teacher_recipe(work, Path(train), Path(tokenizer), budget, sample_by))
    try:
        Distiller(cfg, resume="auto" if resume else "none", overwrite=not resume).train()
    except TrainingStopped:
        raise  # checkpointed: the next call resumes it
    except Exception:
        shutil.rmtree(work, ignore_errors=True)  # never leave a half-trained teacher behind
        raise
    shutil.rmtree(cached, ignore_errors=True)
    (work / "final").rename(cached)
    shutil.rmtree(work, ignore_errors=True)
    return cached
