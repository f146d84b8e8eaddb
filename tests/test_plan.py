"""The memory planner: exact parts (parameter counts, sharding, optimizer states) and the estimate
against the peak memory of a real CPU training step.

The measurement runs in a fresh subprocess (this file run as a script) with glibc's mmap threshold
pinned low, so every tensor lives in its own mapping and returns to the OS when freed: the resident
set then follows live tensors closely. The peak comes from the kernel's high-water mark (VmHWM),
reset through /proc/self/clear_refs just before the measured phase.
"""

from __future__ import annotations

import argparse
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

from sakd.commands.plan import parse_memory, register
from sakd.config import ConfigError
from sakd.models.presets import build_preset_config
from sakd.planner.estimate import (
    GIB,
    REDUCE_BUCKET_ELEMENTS,
    Estimate,
    Setup,
    Workload,
    candidate_setups,
    estimate,
    generation_bytes,
    kv_cache_bytes,
    loss_bytes,
    rank,
)
from sakd.planner.sizes import ModelNumbers, model_numbers, numbers_from_config

RECIPE = Path(__file__).resolve().parents[1] / "sakd" / "recipes" / "huihui-moe-1b-to-smollm-135m.yaml"
REAL_PAIR = ["model.teacher=huihui-moe-1.2b", "model.student=smollm-135m"]

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


# ----------------------------------------------------------------------------- exact, pure parts


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense", "smollm-135m", "huihui-moe-1.2b"])
def test_parameter_counts_match_the_real_model(preset: str) -> None:
    got = model_numbers(preset)
    if preset.startswith("tiny"):
        model = AutoModelForCausalLM.from_config(build_preset_config(preset))
        assert got.total_params == sum(p.numel() for p in model.parameters())
    expected = {"smollm-135m": 134_515_008, "huihui-moe-1.2b": 1_280_200_704}
    if preset in expected:
        assert got.total_params == expected[preset]


def test_moe_active_parameters() -> None:
    huihui = model_numbers("huihui-moe-1.2b")
    expert = 3 * 1024 * 3072  # gate, up, down of one expert
    assert huihui.total_params - huihui.active_params == 28 * 2 * expert  # two of three experts idle
    assert (huihui.experts, huihui.experts_per_token, huihui.tied, huihui.qk_norm) == (3, 1, False, True)
    smol = model_numbers("smollm-135m")
    assert smol.active_params == smol.total_params and smol.tied
    assert (smol.hidden, smol.layers, smol.heads, smol.kv_heads, smol.vocab, smol.ffn) == (
        576,
        30,
        9,
        3,
        49152,
        1536,
    )
    assert model_numbers("smollm-135m", vocab_size=1000).vocab == 1000


def test_local_model_directory(tmp_path: Path) -> None:
    LlamaConfig(**STUDENT).save_pretrained(tmp_path)
    assert model_numbers(str(tmp_path)) == numbers_from_config(LlamaConfig(**STUDENT), str(tmp_path))


def test_unknown_model_is_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the model config") as e:
        model_numbers(str(tmp_path))
    assert "\n" not in str(e.value)


def _pair_estimate(setup: Setup, **work: Any) -> Estimate:
    student, teacher = model_numbers("smollm-135m"), model_numbers("huihui-moe-1.2b")
    return estimate(student, teacher, setup, Workload(seq_len=384, **work))


def test_zero_sharding_divides_by_the_number_of_gpus() -> None:
    p = model_numbers("smollm-135m").total_params
    one = _pair_estimate(Setup(stage=3), num_gpus=1, mixed_precision="fp16").components
    four = _pair_estimate(Setup(stage=3), num_gpus=4, mixed_precision="fp16").components
    assert one["optimizer"] == 8 * p and four["optimizer"] == 8 * p // 4
    teacher_p = model_numbers("huihui-moe-1.2b").total_params
    gathered = one["teacher_weights"] - 4 * teacher_p  # fp32 teacher, ZeRO-3 placement on stage 3
    assert four["teacher_weights"] == 4 * teacher_p // 4 + gathered
    # ZeRO-1 shards only the optimizer; ZeRO-2 the gradients too; ZeRO-0 (DDP) nothing.
    z1 = _pair_estimate(Setup(stage=1), num_gpus=4, mixed_precision="fp16").components
    z2 = _pair_estimate(Setup(stage=2), num_gpus=4, mixed_precision="fp16").components
    assert z1["optimizer"] == z2["optimizer"] == 8 * p // 4
    p16 = 2 * p  # fp16 gradients: whole on ZeRO-1, a quarter plus two reduce buckets on ZeRO-2
    assert z1["gradients"] - z2["gradients"] == p16 - (p16 // 4 + 2 * REDUCE_BUCKET_ELEMENTS * 2)
    assert z1["student_weights"] == z2["student_weights"]
    ddp = _pair_estimate(Setup(stage=0), num_gpus=4).components
    assert ddp["optimizer"] == 8 * p and ddp["teacher_weights"] == 4 * teacher_p


def test_optimizer_states_8bit_and_offload() -> None:
    fp32 = _pair_estimate(Setup(stage=0)).components["optimizer"]
    assert _pair_estimate(Setup(stage=0, optimizer="adamw_8bit")).components["optimizer"] * 4 == fp32
    off = _pair_estimate(Setup(stage=2, offload_optimizer=True), mixed_precision="fp16").components
    assert off["optimizer"] == 0
    z2 = _pair_estimate(Setup(stage=2), mixed_precision="fp16").components
    assert off["student_weights"] < z2["student_weights"]  # the fp32 master went to the CPU
    assert not any(s.offload_optimizer and s.optimizer == "adamw_8bit" for s in candidate_setups([1]))


def test_teacher_offload_and_placement() -> None:
    t = model_numbers("huihui-moe-1.2b")
    replicated = _pair_estimate(Setup(stage=3), teacher_placement="replicated", teacher_dtype="float16")
    assert replicated.components["teacher_weights"] == 2 * t.total_params
    offloaded = _pair_estimate(Setup(stage=3), teacher_offload=True, teacher_dtype="float16")
    assert offloaded.components["teacher_weights"] == 2 * 2 * t.layer_params


def test_checkpointing_and_micro_batch_scale_activations() -> None:
    plain = _pair_estimate(Setup(stage=0, micro_batch=2)).components["activations"]
    assert _pair_estimate(Setup(stage=0, micro_batch=4)).components["activations"] == 2 * plain
    ckpt = _pair_estimate(Setup(stage=0, micro_batch=2, gradient_checkpointing=True)).components[
        "activations"
    ]
    assert ckpt < plain / 4


def test_ranking_prefers_speed_among_fitting_plans() -> None:
    estimates = [_pair_estimate(s, mixed_precision="fp16") for s in candidate_setups([1, 4])]
    fitting = rank(estimates, 80 * 10**9)
    best = fitting[0].setup
    assert (best.stage, best.offload_optimizer, best.gradient_checkpointing, best.micro_batch) == (
        0,
        False,
        False,
        4,
    )
    assert rank(estimates, 10**9) == []


def test_kv_cache_is_the_cache_transformers_generate_builds() -> None:
    """The KV cache term against the tensors ``generate`` really keeps (a GQA model and an MoE one)."""
    from transformers import LlamaForCausalLM, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    for name, cls in (("tiny-dense", LlamaForCausalLM), ("tiny-moe", Qwen3MoeForCausalLM)):
        cfg = build_preset_config(name, vocab_size=256)
        model = cls(cfg).eval()
        ids = torch.randint(2, 256, (3, 11))
        out = model.generate(
            ids,
            max_new_tokens=7,
            min_new_tokens=7,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        cache = out.past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        tokens = ids.shape[1] + 7 - 1  # the last token is sampled but never fed back
        assert held == kv_cache_bytes(numbers_from_config(cfg, name), 3, tokens, 4), name


def test_generation_is_counted_beyond_the_steps_own_transients() -> None:
    s, t = model_numbers("smollm-135m"), model_numbers("huihui-moe-1.2b")
    setup = Setup(stage=3, micro_batch=1)
    assert _pair_estimate(setup, num_gpus=8).components["generation"] == 0  # policy off
    work = Workload(seq_len=384, num_gpus=8, generated_seq_len=96)
    kv, logits = kv_cache_bytes(s, 1, 96, 4), 3 * 1 * s.vocab * 4
    gathered = s.total_params * 4 * 7 // 8  # ZeRO-3: the rest of the student, whole for generation
    assert generation_bytes(s, t, setup, work, 4) == kv + logits + gathered
    on = estimate(s, t, setup, work).components
    transients = on["activations"] + on["teacher_activations"] + on["loss"]
    assert on["generation"] == max(0, kv + logits + gathered - transients)
    # sequence-level KD, long generations: the (large) teacher's cache dominates; no student gather
    work = Workload(seq_len=384, num_gpus=8, generated_seq_len=4096, teacher_writes=True)
    seq = estimate(s, t, Setup(stage=3, micro_batch=4), work).components
    transients = seq["activations"] + seq["teacher_activations"] + seq["loss"]
    assert seq["generation"] == kv_cache_bytes(t, 4, 4096, 4) + 3 * 4 * t.vocab * 4 - transients > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16GB", 16 * 10**9), ("16GiB", 16 * GIB), ("80G", 80 * 10**9), ("16000MB", 16 * 10**9)],
)
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "16XB", "-1GB", "0GB", ""])
def test_parse_memory_rejects_bad_values(text: str) -> None:
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory(text)


def _run_plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["plan", "--config", str(RECIPE), *REAL_PAIR, *argv])
    return args.func(args)


def test_cli_recommends_a_plan_for_the_real_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_plan(["--gpu-memory", "16GB", "--num-gpus", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["recommended"]
    assert best["fits"] and best["total_bytes"] <= 0.9 * 16 * 10**9  # the default 10 % headroom
    assert out["as_configured"]["gradient_checkpointing"] is True and out["as_configured"]["micro_batch"] == 4
    assert _run_plan(["--gpu-memory", "16GB", "--micro-batches", "2", "4"]) == 0
    assert "recommended:" in capsys.readouterr().out


def test_cli_rejects_a_bad_memory_size() -> None:
    with pytest.raises(ConfigError, match="--gpu-memory"):
        _run_plan(["--gpu-memory", "sixteen"])


def test_cli_fails_with_one_line_when_nothing_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_plan(["--gpu-memory", "2GB"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no setup fits") and len(err.splitlines()) == 1


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


def _measured(mode: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [sys.executable, __file__, mode], capture_output=True, text=True, env=env, check=True, timeout=120
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
