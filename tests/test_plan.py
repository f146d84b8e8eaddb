"""The memory planner's exact parts (parameter counts, sharding, optimizer states, the KV cache, the CLI);
its estimate against a measured CPU peak is in tests/test_plan_measured.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_plan_measured import STUDENT  # tests/ is on sys.path (pytest rootdir-less import)
from transformers import AutoModelForCausalLM, LlamaConfig

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
    rank,
)
from sakd.planner.sizes import model_numbers, numbers_from_config

RECIPE = Path(__file__).resolve().parents[1] / "sakd" / "recipes" / "huihui-moe-1b-to-smollm-135m.yaml"
REAL_PAIR = ["model.teacher=huihui-moe-1.2b", "model.student=smollm-135m"]

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


@pytest.mark.parametrize(
    ("stage", "work"),
    [
        (0, {"student_dtype": "float16"}),  # a half-precision model without autocast
        (2, {"mixed_precision": "fp16"}),  # DeepSpeed's fp16 engine
        (2, {"student_dtype": "float16"}),  # ZeRO with the model itself in fp16
    ],
)
def test_an_fp16_heads_loss_gradients_are_counted_in_float32(stage: int, work: dict[str, Any]) -> None:
    """The fused losses keep an fp16 head's gradients ([tokens, H] + [V, H]) in float32 until backward
    (sakd.losses.stored_grads); bf16 keeps its own 2 bytes."""
    student = model_numbers("smollm-135m")
    bf16_work = {k: ("bfloat16" if v == "float16" else "bf16") for k, v in work.items()}
    fp16 = _pair_estimate(Setup(stage=stage), **work).components["loss"]
    bf16 = _pair_estimate(Setup(stage=stage), **bf16_work).components["loss"]
    assert fp16 - bf16 == (384 + student.vocab) * student.hidden * 2  # Setup.micro_batch 1 × 384 tokens
