"""`sakd plan`'s estimate, table and recommendation (the arguments are in :mod:`sakd.commands.plan`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sakd.config import ConfigError, RunConfig
from sakd.losses.chunk_size import resolve_chunk_size
from sakd.planner.estimate import (
    COMPONENTS,
    GIB,
    Estimate,
    Setup,
    Workload,
    candidate_setups,
    estimate,
    rank,
)
from sakd.planner.sizes import ModelNumbers, model_config, model_numbers, with_adapters


def _as_configured(cfg: RunConfig) -> Setup:
    """The setup the recipe itself asks for (ZeRO stage and offload read from its DeepSpeed JSON)."""
    zero: dict[str, Any] = {}
    if cfg.training.deepspeed:
        try:
            zero = json.loads(Path(cfg.training.deepspeed).read_text()).get("zero_optimization", {})
        except (OSError, ValueError, AttributeError):
            raise ConfigError(
                f"training.deepspeed: cannot read a DeepSpeed JSON from {cfg.training.deepspeed}"
            ) from None
    stage = int(zero.get("stage", 0))

    def on_cpu(key: str) -> bool:
        return isinstance(zero.get(key), dict) and zero[key].get("device") == "cpu"

    optimizer = "adamw_8bit" if "8bit" in cfg.optimization.optimizer else "adamw"
    return Setup(
        stage=stage,
        offload_optimizer=on_cpu("offload_optimizer"),
        offload_params=on_cpu("offload_param"),
        optimizer=optimizer,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        micro_batch=cfg.training.batch_size,
    )


def _row(label: str, e: Estimate, budget: int) -> str:
    cells = "".join(f"{e.components[c] / GIB:>8.2f}" for c in COMPONENTS)
    verdict = "fits" if e.total <= budget else "OVER"
    return f"{label:<44}{cells}{e.total / GIB:>8.2f}  {verdict}  x{e.setup.cost():.2f}"


def _header() -> str:
    short = ("teach_w", "stud_w", "grads", "optim", "act", "t_act", "loss", "gen", "ovhd")
    return f"{'plan (GiB per GPU)':<44}" + "".join(f"{s:>8}" for s in short) + f"{'total':>8}  fits  time"


def _overrides_for(setup: Setup, cfg: RunConfig) -> str:
    """The recipe keys that select ``setup`` (the accumulation keeps the tokens per optimizer step; the
    DeepSpeed JSONs are the repository's ds_configs, run with ``accelerate launch``)."""
    blocks = cfg.training.batch_size * cfg.training.gradient_accumulation_steps
    parts = [f"training.batch_size={setup.micro_batch}"]
    if setup.stage:
        offload = "_offload" if setup.offload_optimizer else ""
        parts.append(f"training.deepspeed=ds_configs/zero{setup.stage}{offload}.json")
    if blocks % setup.micro_batch == 0:
        parts.append(f"training.gradient_accumulation_steps={blocks // setup.micro_batch}")
    parts.append(f"model.gradient_checkpointing={str(setup.gradient_checkpointing).lower()}")
    parts.append(f"optimization.optimizer={setup.optimizer}")
    return " ".join(parts)


def _chunk_hint(best: Estimate, student: ModelNumbers, teacher: ModelNumbers | None, work: Workload) -> None:
    """Point at distillation.loss.chunk_size when the fused loss's workspace is a large share: a
    smaller chunk costs little speed (each chunk is still a large matmul) and frees memory for a larger
    micro-batch."""
    if (
        not isinstance(work.chunk_size, int)
        or best.components["loss"] < best.total / 5
        or work.chunk_size < 256
    ):
        return
    smaller = replace(work, chunk_size=work.chunk_size // 4)
    then = estimate(student, teacher, best.setup, smaller).components["loss"]
    print(
        f"  hint: the fused loss takes {best.components['loss'] / GIB:.2f} GiB; "
        f"distillation.loss.chunk_size={smaller.chunk_size} would make it {then / GIB:.2f} GiB"
    )


def _chunk_text(student: ModelNumbers, teacher: ModelNumbers | None, work: Workload) -> str:
    if work.chunk_size != "auto":
        return str(work.chunk_size)
    sizes = (
        (student.vocab, teacher.vocab if teacher else 0),
        (student.hidden, teacher.hidden if teacher else 0),
    )
    return f"auto ({resolve_chunk_size('auto', work.seq_len, *sizes)} tokens at micro-batch 1)"


def _print_table(
    student: ModelNumbers,
    teacher: ModelNumbers | None,
    work: Workload,
    memory_and_budget: tuple[int, int],
    configured: Estimate,
    fitting: list[Estimate],
) -> None:
    def describe(m: ModelNumbers) -> str:
        moe = f", {m.experts} experts / {m.experts_per_token} active" if m.experts else ""
        trained = f", {m.trained / 1e6:.2f}M trained (adapters)" if m.trained != m.total_params else ""
        return (
            f"{m.name}: {m.total_params / 1e6:.1f}M params ({m.active_params / 1e6:.1f}M active{trained}), "
            f"{m.layers} layers, hidden {m.hidden}, vocab {m.vocab}{moe}"
        )

    memory, budget = memory_and_budget
    print(f"student {describe(student)}")
    if teacher is not None:
        print(f"teacher {describe(teacher)}")
    print(
        f"{work.num_gpus} GPU(s) x {memory / GIB:.2f} GiB, plans must fit in {budget / GIB:.2f} GiB; seq {work.seq_len}, mixed precision "
        f"{work.mixed_precision}, teacher {work.teacher_dtype}, loss chunk {_chunk_text(student, teacher, work)}"
        f"{' (vocab-mapped)' if work.aligned else ''}\n"
    )
    print(_header())
    print(_row(f"as configured: {configured.setup.describe()}", configured, budget))
    for e in fitting:
        print(_row(e.setup.describe(), e, budget))


def plan_and_print(args: argparse.Namespace, cfg: RunConfig, memory: int, budget: int) -> int:
    """Estimate every candidate for the recipe, print the fitting ones and the recommendation.

    Returns 0 when some setup fits, 1 (one line on stderr) when none does.
    """
    m = cfg.model
    student = model_numbers(m.student, args.student_vocab, trust_remote_code=m.trust_remote_code)
    if m.peft.method != "none":
        config = model_config(m.student, args.student_vocab, trust_remote_code=m.trust_remote_code)
        student = with_adapters(student, config, m.peft)
    teacher = None
    if cfg.distillation.loss.alpha > 0 or cfg.distillation.policy != "off":
        teacher = model_numbers(m.teacher, args.teacher_vocab, trust_remote_code=m.trust_remote_code)
    aligned = teacher is not None and (
        cfg.distillation.alignment.mode == "always" or teacher.vocab != student.vocab
    )
    work = Workload.from_config(cfg, args.num_gpus, aligned)
    setups = candidate_setups(sorted(set(args.micro_batches)))
    if work.student_quantization != "none":  # QLoRA runs without DeepSpeed
        setups = [s for s in setups if s.stage == 0]
    estimates = [estimate(student, teacher, s, work) for s in setups]
    fitting = rank(estimates, budget)
    configured = estimate(student, teacher, _as_configured(cfg), work)
    if args.json:
        print(
            json.dumps(
                {
                    "gpu_memory_bytes": memory,
                    "budget_bytes": budget,
                    "num_gpus": args.num_gpus,
                    "student": asdict(student),
                    "teacher": None if teacher is None else asdict(teacher),
                    "workload": asdict(work),
                    "as_configured": configured.to_dict(budget),
                    "recommended": fitting[0].to_dict(budget) if fitting else None,
                    "candidates": [
                        e.to_dict(budget) for e in sorted(estimates, key=lambda e: e.setup.cost())
                    ],
                },
                indent=2,
            )
        )
    else:
        _print_table(student, teacher, work, (memory, budget), configured, fitting[: args.top])
    if not fitting:
        smallest = min(estimates, key=lambda e: e.total)
        print(
            f"error: no setup fits in {budget / GIB:.2f} GiB (after headroom) per GPU on {args.num_gpus} GPU(s); the smallest "
            f"({smallest.setup.describe()}) needs {smallest.total / GIB:.2f} GiB",
            file=sys.stderr,
        )
        return 1
    if not args.json:
        best = fitting[0]
        print(f"\nrecommended: {best.setup.describe()} ({best.total / GIB:.2f} of {budget / GIB:.2f} GiB)")
        print(f"  overrides: {_overrides_for(best.setup, cfg)}")
        _chunk_hint(best, student, teacher, work)
    return 0
