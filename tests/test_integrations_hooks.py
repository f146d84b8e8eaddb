"""``DistillationTrainer`` across Trainer checkpoints and optimizer steps: regex LR multipliers shape the
optimizer; save / evaluate / resume; the per-step hooks (curriculum balancing, the token router) resume exactly
from a Trainer checkpoint, also under DeepSpeed, and learn only from steps that were taken (moved out of
test_integrations.py, assertions unchanged)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_integrations import ROOT, _run, _tiny_trainer  # tests/ is on sys.path (pytest rootdir-less import)
from transformers import AutoModelForCausalLM

from sakd.integrations.hf_trainer import AUX_FILE

pytestmark = pytest.mark.integration


def test_lr_multipliers_shape_the_optimizer_groups(tokenizer_dir, corpus, tmp_path):
    trainer = _tiny_trainer(
        tokenizer_dir, corpus, tmp_path, lr_multipliers={"embed_tokens": 0.0, r"layers\.0\.": 0.5}
    )
    optimizer = trainer.create_optimizer()
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in trainer.student.named_parameters():
        if "embed_tokens" in name:
            assert not p.requires_grad and id(p) not in by_id, name
        elif "layers.0." in name:
            assert by_id[id(p)] == pytest.approx(5e-4), name
        else:
            assert by_id[id(p)] == pytest.approx(1e-3), name
    assert all(by_id[id(p)] == pytest.approx(1e-3) for p in trainer.model.aux.parameters())
    assert isinstance(optimizer, torch.optim.AdamW)


def test_save_evaluate_and_resume_from_a_trainer_checkpoint(tokenizer_dir, corpus, tmp_path):
    """save_model writes the student alone (plain from_pretrained) plus the projections; evaluate gives the
    held-out objective; 2 steps + resume + 2 steps == 4 steps (student and projections)."""
    full = _tiny_trainer(tokenizer_dir, corpus, tmp_path / "full", args={"max_steps": 4})
    full.train()
    full.save_model()
    out = tmp_path / "full"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert set(model.state_dict()) == set(full.student.state_dict()) and (out / AUX_FILE).is_file()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, full.student.state_dict()[k], rtol=0, atol=0, msg=k)
    metrics = full.evaluate()
    assert 0 < metrics["eval_loss"] < 20

    first = _tiny_trainer(
        tokenizer_dir,
        corpus,
        tmp_path / "resumed",
        args={"max_steps": 4, "save_strategy": "steps", "save_steps": 2},
    )
    first.train()
    resumed = _tiny_trainer(tokenizer_dir, corpus, tmp_path / "resumed", args={"max_steps": 4})
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for k, v in resumed.student.state_dict().items():
        torch.testing.assert_close(v, full.student.state_dict()[k], rtol=0, atol=1e-6, msg=k)
    for k, v in resumed.model.aux.state_dict().items():
        torch.testing.assert_close(v, full.model.aux.state_dict()[k], rtol=0, atol=1e-6, msg=k)


def test_the_per_step_parts_resume_exactly_from_a_trainer_checkpoint(tokenizer_dir, corpus, tmp_path):
    """The hooks' state (the balancer's magnitudes, the token router's statistics) is in the Trainer's
    checkpoint: 2 steps + resume + 2 steps == 4 steps, losses and weights."""
    parts = {
        "feature": {"weight": 0.5},
        "curriculum": {"balance": True},
        "router": {"enabled": True, "sharpen_start": 0.0, "sharpen_end": 0.5},
    }
    full = _tiny_trainer(tokenizer_dir, corpus, tmp_path / "full", parts, args={"max_steps": 4})
    full.train()
    save = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    _tiny_trainer(tokenizer_dir, corpus, tmp_path / "resumed", parts, args=save).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "student_aware.json").is_file() and (
        checkpoint / "token_router.safetensors"
    ).is_file()
    resumed = _tiny_trainer(tokenizer_dir, corpus, tmp_path / "resumed", parts, args={"max_steps": 4})
    resumed.train(resume_from_checkpoint=str(checkpoint))
    logs = {h["step"]: h for h in full.state.log_history if "loss" in h}
    for h in (h for h in resumed.state.log_history if "loss" in h):
        for key in ("loss", "kd", "mult_kd", "router_w_max"):
            assert h[key] == pytest.approx(logs[h["step"]][key], rel=1e-6), (h["step"], key)
    for k, v in resumed.student.state_dict().items():
        torch.testing.assert_close(v, full.student.state_dict()[k], rtol=0, atol=1e-6, msg=k)


def test_the_hooks_learn_only_from_a_taken_step(tokenizer_dir, corpus, tmp_path):
    """A step whose loss is finite but whose gradient is not (a NaN put into one parameter's gradient at
    step 1) is not a taken step: the balancer does not learn from it, as in sakd distill (review of issue
    22: under the Trainer the hooks learned from every step whose loss was finite)."""
    import math

    from transformers import TrainerCallback

    parts = {"feature": {"weight": 0.5}, "curriculum": {"balance": True}}
    trainer = _tiny_trainer(tokenizer_dir, corpus, tmp_path, parts, args={"max_steps": 2})
    curriculum, seen = trainer.hooks.aware.curriculum, []

    class Record(TrainerCallback):  # after the hooks' own on_step_end
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(curriculum.state_dict())

    trainer.add_callback(Record())
    weight = next(trainer.student.parameters())
    weight.register_hook(lambda g: g * math.nan if trainer.state.global_step == 1 else g)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(logs[1]["kd"]) and not math.isfinite(logs[1]["grad_norm"])
    assert len(seen) == 2 and seen[0] and seen[1] == seen[0]


@pytest.mark.multiprocess
def test_the_per_step_parts_resume_exactly_under_deepspeed(tokenizer_dir, corpus, tmp_path):
    """Under DeepSpeed (ZeRO-2, one process) the Trainer resumes from the engine's checkpoint without calling
    _load_from_checkpoint: the hooks' state (the balancer's magnitudes, the token router's statistics) is
    restored all the same (review of issue 22: it was not, so mult_kd restarted at 1.0 after a resume)."""
    worker = ROOT / "tests" / "workers" / "hf_trainer_resume_worker.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    _run([*launcher, str(worker), str(tokenizer_dir), str(corpus), str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    full, resumed = result["full"], result["resumed"]
    assert {"3", "4"} <= set(resumed)
    for step in ("3", "4"):
        for key, value in resumed[step].items():
            assert value == pytest.approx(full[step][key], rel=1e-6), (step, key)
    for k, v in result["weights"]["resumed"].items():
        assert v == pytest.approx(result["weights"]["full"][k], abs=1e-6), k
