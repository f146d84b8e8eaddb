"""Single-process pieces of the scale-out path (the multi-process runs are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from sakd.config import ConfigError, OptimizationConfig, RunConfig
from sakd.config.deepspeed import fill_ds_config, zero_stage
from sakd.errors import SetupError
from sakd.evaluation.heldout import rank_batches
from sakd.models.student import TrainableStudent, student_state
from sakd.training.distributed import check_cuda_arch


def _fake_gpu(monkeypatch, capability, arch_list, name="Tesla P100-PCIE-16GB"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


def test_p100_under_a_cuda_12_8_wheel_stops_with_the_fix(monkeypatch):
    _fake_gpu(monkeypatch, (6, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    with pytest.raises(SetupError) as e:
        check_cuda_arch()
    msg = str(e.value)
    assert "\n" not in msg and "sm_60" in msg and "P100" in msg and "cu126" in msg


@pytest.mark.parametrize(
    "capability,arch_list",
    [
        ((6, 0), ["sm_50", "sm_60", "sm_70"]),  # a cu126 build has P100 kernels
        ((9, 0), ["sm_80", "compute_80"]),  # PTX for an older arch JIT-compiles on a newer GPU
        ((8, 0), ["sm_80", "sm_90"]),
    ],
)
def test_supported_architectures_pass(monkeypatch, capability, arch_list):
    _fake_gpu(monkeypatch, capability, arch_list)
    check_cuda_arch()


def test_fill_ds_config_fills_every_auto_we_own():
    cfg = RunConfig()
    cfg.training.batch_size, cfg.training.gradient_accumulation_steps = 3, 5
    cfg.training.mixed_precision = "bf16"
    cfg.optimization.max_grad_norm = None
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "fp16": {"enabled": "auto"},
        "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto"}},
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": "auto"},
    }
    out = fill_ds_config(ds, cfg, world_size=4)
    assert ds["train_batch_size"] == "auto"  # the input is not modified
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]) == (3, 5)
    assert out["train_batch_size"] == 60 and out["gradient_clipping"] == 0.0
    assert out["fp16"]["enabled"] is False and out["bf16"]["enabled"] is True
    assert out["optimizer"]["params"] == {
        "lr": cfg.optimization.learning_rate,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
    }
    assert out["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero_stage(out) == 3 and zero_stage(None) == -1
    assert "train_batch_size" not in fill_ds_config(ds, cfg, world_size=None)  # DeepSpeed derives it


@pytest.mark.parametrize(
    "precision,section", [("no", {"fp16": {"enabled": True}}), ("fp16", {"fp16": {"enabled": False}})]
)
def test_fill_ds_config_refuses_contradicting_precision(precision, section):
    cfg = RunConfig()
    cfg.training.mixed_precision = precision
    with pytest.raises(ConfigError, match="mixed_precision"):
        fill_ds_config(section, cfg, 1)


@pytest.mark.parametrize("n,batch,world", [(8, 2, 2), (9, 2, 2), (1, 4, 2), (17, 3, 4), (5, 8, 1)])
def test_rank_batches_same_count_on_every_rank_and_each_block_once(n, batch, world):
    per_rank = [list(rank_batches(n, batch, r, world)) for r in range(world)]
    assert len({len(x) for x in per_rank}) == 1  # equal forwards: collectives never wait forever
    counted = sorted(i for x in per_rank for lo, ok in x if ok for i in range(lo, min(lo + batch, n)))
    assert counted == list(range(n))


def test_trainable_student_exports_only_the_student():
    student = torch.nn.Linear(2, 3)
    aux = torch.nn.Linear(3, 4)
    state = TrainableStudent(student, aux).state_dict()
    assert set(state) == {"module.weight", "module.bias", "aux.weight", "aux.bias"}
    assert set(student_state(state)) == {"weight", "bias"}
    assert student_state(student.state_dict()).keys() == student.state_dict().keys()


def test_8bit_optimizers():
    from sakd.training.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    opt = build_optimizer(model, OptimizationConfig(optimizer="adamw_8bit"))
    assert type(opt).__name__ == "AdamW8bit"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            build_optimizer(model, OptimizationConfig(optimizer="paged_adamw_8bit"))


def test_quantized_teacher_needs_cuda():
    from sakd.models import ModelLoadError, load_model

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_model("tiny-moe", quantization="8bit", device="cpu")


def test_optimizer_offload_needs_deepspeed_cpu_adam_and_keeps_it_adamw():
    from pathlib import Path

    from sakd.config.deepspeed import run_ds_config

    path = Path(__file__).parents[1] / "ds_configs" / "zero2_offload.json"
    cfg = RunConfig()
    with pytest.raises(ConfigError, match="optimization.optimizer=ds_cpu_adam"):
        run_ds_config(path, cfg, 1)
    cfg.optimization.optimizer = "ds_cpu_adam"
    # off: with it on, accelerate rebuilds DeepSpeedCPUAdam in plain-Adam (L2) mode
    assert run_ds_config(path, cfg, 1)["zero_force_ds_cpu_optimizer"] is False
    no_offload = Path(__file__).parents[1] / "ds_configs" / "zero2.json"
    assert "zero_force_ds_cpu_optimizer" not in run_ds_config(no_offload, RunConfig(), 1)
