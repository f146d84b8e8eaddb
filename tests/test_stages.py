"""Multi-stage training: each stage its own rules, length and LR; optimizer and schedule re-created at
stage boundaries; a run resumed mid-stage (or across a boundary) ends bitwise identical."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sakd.config import ConfigError, load_config
from sakd.training.trainer import Distiller

pytestmark = pytest.mark.integration

STAGES = [
    {"name": "head-only", "steps": 3, "learning_rate": 2e-3, "lr_multipliers": {"embed_tokens": 0.0}},
    {"name": "all", "steps": 3, "learning_rate": 5e-4, "warmup_steps": 0},
]


def _raw(tiny_run_config, out, **training):
    raw = copy.deepcopy(tiny_run_config)
    raw["optimization"].update(stages=STAGES, lr_scheduler="constant_with_warmup", warmup_steps=0)
    raw["training"].update(output_dir=str(out), batch_size=2, max_steps=None, **training)
    return raw


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_stages_freeze_then_train_with_their_own_lr_and_fresh_optimizer(tiny_run_config, tmp_path):
    cfg, _ = load_config(_raw(tiny_run_config, tmp_path / "run"))
    d = Distiller(cfg, resume="none", overwrite=True)
    assert d.total_steps == 6 and d.stage_ends == [3, 6]
    embed = d.hf_student.get_input_embeddings().weight
    before = embed.detach().clone()
    for _ in range(3):
        d._enter_stage_if_due()
        d.train_step(d._micro_batches())
        d.state.step += 1
        d.state.step_in_epoch += 1
    assert torch.equal(embed, before) and not embed.requires_grad  # stage 0 froze it
    first_optimizer = d.optimizer
    d._enter_stage_if_due()
    assert d.state.stage == 1 and d.optimizer is not first_optimizer
    assert embed.requires_grad and not d.optimizer.state  # unfrozen; Adam moments start afresh
    assert [g["lr"] for g in d.optimizer.param_groups] == [5e-4] * len(d.optimizer.param_groups)
    d.train_step(d._micro_batches())
    assert not torch.equal(embed, before)
    assert len(d.accelerator._optimizers) == 1  # a checkpoint holds the current stage's state only


def test_logged_stage_and_lr_per_step(tiny_run_config, tmp_path):
    cfg, _ = load_config(_raw(tiny_run_config, tmp_path / "run"))
    Distiller(cfg, resume="none", overwrite=True).train()
    records = _records(tmp_path / "run")
    assert [r["stage"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert [r["lr"] for r in records] == [2e-3] * 3 + [5e-4] * 3


@pytest.mark.parametrize("resume_at", [2, 4], ids=["mid-stage-0", "mid-stage-1"])
def test_resume_mid_stage_is_bitwise_identical(tiny_run_config, tmp_path, resume_at):
    full = tmp_path / "full"
    cfg, _ = load_config(_raw(tiny_run_config, full, save_every=2, keep_last_n=5))
    Distiller(cfg, resume="none", overwrite=True).train()
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for step in (s for s in (2, 4, 6) if s > resume_at):
        shutil.rmtree(resumed / "checkpoints" / f"step-{step:08d}")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    cfg, _ = load_config(_raw(tiny_run_config, resumed, save_every=2, keep_last_n=5))
    d = Distiller(cfg, resume="auto")
    assert d.state.step == resume_at and d.state.stage == (0 if resume_at < 3 else 1)
    d.train()
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _records(full)] == [r["loss"] for r in _records(resumed)]


def test_a_stage_needs_a_length():
    with pytest.raises(ConfigError, match=r"optimization.stages\[0\] needs steps or epochs"):
        load_config({"optimization": {"stages": [{"name": "x"}]}})


def test_stages_are_refused_where_they_cannot_work():
    from sakd.config import OptimizationConfig, StageConfig
    from sakd.errors import ConfigError
    from sakd.training.stages import check_stages

    model = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4))  # params "0.weight", "1.*"
    same = OptimizationConfig(stages=[StageConfig(steps=1), StageConfig(steps=1, learning_rate=1e-4)])
    differ = OptimizationConfig(
        stages=[StageConfig(steps=1, lr_multipliers={r"^0\.": 0.0}), StageConfig(steps=1)]
    )
    with pytest.raises(ConfigError, match="DDP"):
        check_stages(differ, model, zero=-1, world=2)
    check_stages(same, model, zero=-1, world=2)  # same frozen set: fine under DDP
    check_stages(same, model, zero=2, world=2)  # and under ZeRO-1/2: a new engine per stage
    check_stages(same, model, zero=3, world=2)  # and ZeRO-3: the new engine takes the partitioned module
    check_stages(differ, model, zero=-1, world=1)  # one process may change it
