"""The memory planner's estimate against the peak memory of a real CPU training step (split from
tests/test_plan.py, which holds the exact, pure parts).

The measurement runs in a fresh subprocess (this file run as a script) with glibc's mmap threshold
pinned low, so every tensor lives in its own mapping and returns to the OS when freed: the resident
set then follows live tensors closely. The peak comes from the kernel's high-water mark (VmHWM),
reset through /proc/self/clear_refs just before the measured phase.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

from sakd.planner.estimate import Estimate, Setup, Workload, estimate, loss_bytes
from sakd.planner.sizes import ModelNumbers, model_numbers, numbers_from_config

# Sized so that weights, optimizer states and activations are each tens of MB, far above allocator
# noise, while a step stays ~1-2 s on two slow cores.
STUDENT = dict(
    vocab_size=8192,
    hidden_size=384,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
TEACHER = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=4,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
BATCH, SEQ, CHUNK = 4, 256, 256


# ------------------------------------------------------------------- estimate vs measured peak


def _vm(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _step(
    student_cfg: dict[str, Any], teacher_cfg: dict[str, Any], checkpointing: bool, ids: torch.Tensor
) -> tuple[Any, ...]:
    """Build teacher and student and take one optimizer step (so AdamW's states exist); returns the
    models, the optimizer and a function running one micro-batch: teacher no-grad forward, student
    forward, fused KD+CE loss, backward."""
    from sakd.losses import fused_linear_divergence

    student = AutoModelForCausalLM.from_config(LlamaConfig(**student_cfg), attn_implementation="sdpa")
    teacher = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**teacher_cfg), attn_implementation="sdpa")
    teacher.requires_grad_(False).eval()
    student.train()
    if checkpointing:
        student.gradient_checkpointing_enable()

    def micro_batch() -> None:
        with torch.no_grad():
            t_hidden = teacher.model(ids).last_hidden_state
        s_hidden = student.model(ids).last_hidden_state
        out = fused_linear_divergence(
            s_hidden[:, :-1],
            student.lm_head.weight,
            t_hidden[:, :-1],
            teacher.lm_head.weight,
            "fkl",
            temperature=2.0,
            chunk_size=CHUNK,
            labels=ids[:, 1:],
            alpha=0.5,
        )
        out.loss.backward()

    return student, teacher, micro_batch


def _measure(checkpointing: bool) -> dict[str, int]:
    """Peak memory over two accumulated micro-batches after one optimizer step, relative to the
    resident set before the models were built. A small run of the same code first pages in the
    libraries' kernels and thread pools (the CPU's counterpart of the CUDA context)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(0, STUDENT["vocab_size"], (BATCH, SEQ))
    small = {"hidden_size": 96, "intermediate_size": 128, "vocab_size": 512}
    warm = _step(
        {**STUDENT, **small}, {**TEACHER, **small, "moe_intermediate_size": 128}, checkpointing, ids % 512
    )
    warm[2]()
    del warm
    gc.collect()
    base = _vm("VmRSS")
    student, _teacher, micro_batch = _step(STUDENT, TEACHER, checkpointing, ids)
    weights = _vm("VmRSS") - base
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    micro_batch()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    micro_batch()
    micro_batch()
    return {"weights": weights, "peak": _vm("VmHWM") - base}


ALIGNED_VOCABS = ((16384, 4096), (4096, 32768))  # (student, teacher): each constant dominates once
ALIGNED_TOKENS, ALIGNED_HIDDEN = 256, 32


def _measure_aligned() -> dict[str, int]:
    """Peak of the fused loss's vocab-mapped path (many-to-one projection, chain rule, CE), forward and
    backward, one chunk, per (student, teacher) vocabulary pair."""
    from sakd.losses import fused_linear_divergence

    torch.manual_seed(0)
    n, h = ALIGNED_TOKENS, ALIGNED_HIDDEN
    peaks = {}
    for vs, vt in ALIGNED_VOCABS:
        s_hidden = torch.randn(n, h, requires_grad=True)
        s_weight = torch.randn(vs, h, requires_grad=True)
        t_hidden, t_weight = torch.randn(n, h), torch.randn(vt, h)
        teacher_to_student = torch.randint(-1, vs, (vt,))
        target_logprob = -5 * torch.rand(n)
        target_logprob[::3] = float("nan")
        before = _vm("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        out = fused_linear_divergence(
            s_hidden,
            s_weight,
            t_hidden,
            t_weight,
            "fkl",
            temperature=2.0,
            chunk_size=n,
            labels=torch.randint(0, vs, (n,)),
            alpha=0.5,
            teacher_to_student=teacher_to_student,
            kd_mask=torch.rand(n) > 0.1,
            target_logprob=target_logprob,
            reduction="sum",
        )
        out.loss.backward()
        peaks[f"{vs}-{vt}"] = _vm("VmHWM") - before
    return peaks


def _measured(mode: str, script: str = __file__) -> dict[str, Any]:
    """``python script mode`` in a fresh process (glibc's mmap threshold pinned, one thread): its last JSON line."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [sys.executable, script, mode], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measurements() -> dict[str, dict[str, Any]]:
    """Both subprocesses at once, one core each; the short loss measurement rides with the shorter one."""
    with ThreadPoolExecutor(2) as pool:
        plain, ckpt = pool.map(_measured, ("plain", "ckpt"))
    return {"plain": plain["step"], "ckpt": ckpt["step"], "aligned": ckpt["aligned"]}


def _cpu_estimate(checkpointing: bool) -> Estimate:
    student = numbers_from_config(LlamaConfig(**STUDENT), "student")
    teacher = numbers_from_config(Qwen3MoeConfig(**TEACHER), "teacher")
    setup = Setup(stage=0, gradient_checkpointing=checkpointing, micro_batch=BATCH)
    # The fused loss sees SEQ - 1 positions; a CPU process has no CUDA context.
    return estimate(student, teacher, setup, Workload(seq_len=SEQ - 1, chunk_size=CHUNK, overhead=0))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_matches_measured_cpu_peak(checkpointing: bool, measurements: dict[str, Any]) -> None:
    got = measurements["ckpt" if checkpointing else "plain"]
    c = _cpu_estimate(checkpointing).components
    weights = c["student_weights"] + c["teacher_weights"]
    assert 0.9 <= weights / got["weights"] <= 1.1, (weights, got)
    est = _cpu_estimate(checkpointing).total
    assert 0.75 <= est / got["peak"] <= 1.25, (est, got, c)


def test_checkpointing_saving_matches_measurement(measurements: dict[str, Any]) -> None:
    """The activation difference alone (everything else is identical in the two runs)."""
    measured = measurements["plain"]["peak"] - measurements["ckpt"]["peak"]
    predicted = _cpu_estimate(False).total - _cpu_estimate(True).total
    assert 0.75 <= predicted / measured <= 1.25, (predicted, measured)


@pytest.mark.parametrize(("student_vocab", "teacher_vocab"), ALIGNED_VOCABS)
def test_vocab_mapped_loss_matches_measurement(
    student_vocab: int, teacher_vocab: int, measurements: dict[str, Any]
) -> None:
    def numbers(vocab: int) -> ModelNumbers:
        return replace(model_numbers("tiny-dense"), vocab=vocab, hidden=ALIGNED_HIDDEN)

    work = Workload(seq_len=ALIGNED_TOKENS, chunk_size=ALIGNED_TOKENS, aligned=True)
    workspace, grads = loss_bytes(numbers(student_vocab), numbers(teacher_vocab), ALIGNED_TOKENS, work, 4)
    measured = measurements["aligned"][f"{student_vocab}-{teacher_vocab}"]
    assert 0.75 <= (workspace + grads) / measured <= 1.25, (workspace + grads, measured)


if __name__ == "__main__":
    mode = sys.argv[1]
    result: dict[str, Any] = {"step": _measure(mode == "ckpt")}
    if mode == "ckpt":
        result["aligned"] = _measure_aligned()
    print(json.dumps(result))
