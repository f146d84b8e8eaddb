"""The memory planner with a PEFT student: the trained-parameter count is exact, gradients and optimizer
states are those of the adapters, the frozen head gets no gradient -- and the estimate follows the peak
of a real CPU LoRA step, measured like tests/test_plan_measured.py does (a fresh subprocess, glibc's mmap threshold
pinned low, VmHWM reset before the measured micro-batches)."""

from __future__ import annotations

import gc
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from test_plan_measured import BATCH, CHUNK, SEQ, STUDENT, TEACHER, _step, _vm
from test_plan_measured import _measured as measured_in_fresh_process
from transformers import LlamaConfig, Qwen3MoeConfig

from sakd.config import PeftConfig
from sakd.models.peft import wrap_student
from sakd.models.presets import build_preset_config
from sakd.planner.estimate import Setup, Workload, estimate
from sakd.planner.sizes import model_numbers, numbers_from_config, with_adapters

LORA = PeftConfig(method="lora", rank=8)


@pytest.mark.parametrize(
    "pcfg",
    [
        LORA,
        PeftConfig(method="dora", rank=4, target_modules=["q_proj", "v_proj"]),
        PeftConfig(method="lora", rank=2, modules_to_save=["lm_head"], target_modules=["down_proj"]),
    ],
)
def test_trained_parameters_are_counted_exactly(pcfg: PeftConfig) -> None:
    from transformers import AutoModelForCausalLM

    config = build_preset_config("tiny-dense", vocab_size=512)
    model = wrap_student(AutoModelForCausalLM.from_config(config), pcfg, gradient_checkpointing=False)
    real = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    got = with_adapters(numbers_from_config(config, "s"), config, pcfg)
    assert got.trained == real and got.total_params == model_numbers("tiny-dense", 512).total_params
    assert got.head_trainable == bool(pcfg.modules_to_save)


def test_adapters_change_gradients_and_optimizer_states_only() -> None:
    """Stage 0, fp32 AdamW: gradients 4 bytes and states 8 bytes per *trained* parameter; weights are the
    whole model's; the loss keeps no [V, H] head gradient."""
    config = build_preset_config("smollm-135m")
    full = numbers_from_config(config, "smollm")
    lora = with_adapters(full, config, LORA)
    work, setup = Workload(seq_len=256, overhead=0), Setup(stage=0, micro_batch=2)
    a, b = estimate(full, None, setup, work).components, estimate(lora, None, setup, work).components
    assert b["student_weights"] == a["student_weights"] == 4 * full.total_params
    assert (b["gradients"], b["optimizer"]) == (4 * lora.trained, 8 * lora.trained)
    assert a["loss"] - b["loss"] == full.vocab * full.hidden * 4
    assert 0 < lora.trained < full.total_params / 50


def _measure(lora: bool) -> dict[str, int]:
    """tests/test_plan_measured.py's measured step (teacher no-grad forward, student forward, fused KD+CE loss,
    backward; one optimizer step first), with the student wrapped in LoRA adapters or trained in full."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(0, STUDENT["vocab_size"], (BATCH, SEQ))
    small = {"hidden_size": 96, "intermediate_size": 128, "vocab_size": 512}
    warm = _step({**STUDENT, **small}, {**TEACHER, **small, "moe_intermediate_size": 128}, False, ids % 512)
    if lora:
        wrap_student(warm[0], LORA, gradient_checkpointing=False)
    warm[2]()
    del warm
    gc.collect()
    base = _vm("VmRSS")
    student, _teacher, micro_batch = _step(STUDENT, TEACHER, False, ids)
    if lora:  # the adapters go into the same modules the step's closure calls
        wrap_student(student, LORA, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    micro_batch()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")
    micro_batch()
    micro_batch()
    return {"peak": _vm("VmHWM") - base}


def _measured(mode: str) -> dict[str, Any]:
    return measured_in_fresh_process(mode, __file__)


@pytest.fixture(scope="module")
def measurements() -> dict[str, Any]:
    with ThreadPoolExecutor(2) as pool:
        full, lora = pool.map(_measured, ("full", "lora"))
    return {"full": full["peak"], "lora": lora["peak"]}


def _cpu_estimate(lora: bool) -> int:
    config = LlamaConfig(**STUDENT)
    student = numbers_from_config(config, "student")
    if lora:
        student = with_adapters(student, config, LORA)
    teacher = numbers_from_config(Qwen3MoeConfig(**TEACHER), "teacher")
    setup = Setup(stage=0, micro_batch=BATCH)
    return estimate(student, teacher, setup, Workload(seq_len=SEQ - 1, chunk_size=CHUNK, overhead=0)).total


def test_lora_estimate_and_saving_match_the_measured_cpu_peak(measurements: dict[str, Any]) -> None:
    est = _cpu_estimate(True)
    assert 0.75 <= est / measurements["lora"] <= 1.25, (est, measurements)
    saved, predicted = measurements["full"] - measurements["lora"], _cpu_estimate(False) - est
    assert 0.75 <= predicted / saved <= 1.25, (predicted, saved)


if __name__ == "__main__":
    print(json.dumps(_measure(sys.argv[1] == "lora")))
