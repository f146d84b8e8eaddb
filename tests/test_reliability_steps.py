"""Reliability of a step and of what a run writes: non-finite steps are skipped and change nothing (too many in a
row stop the run), a full disk keeps the previous checkpoint, loss-scaler skips are counted. Split from
tests/test_reliability.py (its recipe helpers are shared from there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_reliability import _recipe, _trained_steps

from sakd.cli import main
from sakd.config import load_config
from sakd.training import checkpoint
from sakd.training.loop import NonFiniteError
from sakd.training.trainer import Distiller

pytestmark = pytest.mark.integration

# ------------------------------------------------------------------------------ non-finite guard


def _poison(d: Distiller, value: float) -> float:
    """Put ``value`` (inf) in one weight of the student (tied embeddings: NaN logits); returns the old one."""
    w = d.hf_student.get_output_embeddings().weight
    with torch.no_grad():
        old = float(w[0, 0])
        w[0, 0] = value
    return old


def test_non_finite_steps_change_nothing_and_stop_the_run(tiny_run_config, tmp_path):
    raw, _ = _recipe(tiny_run_config, tmp_path, "nonfinite")
    raw["training"].update(max_consecutive_skips=3)
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    _poison(d, float("inf"))
    student = d.hf_student
    before = {k: v.clone() for k, v in student.state_dict().items()}
    lr = d.scheduler.get_last_lr()
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        d.train()
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k  # no update, and no NaN written anywhere
    assert sum(int((~torch.isfinite(p)).sum()) for p in student.parameters()) == 1  # just the poison
    assert not d.optimizer.optimizer.state and d.scheduler.get_last_lr() == lr  # neither was stepped
    records = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in records if "skipped_steps" in r]
    assert [(r["step"], r["skipped_steps"]) for r in skips] == [(1, 1), (2, 2), (3, 3)]
    assert all(len(r["sample_ids"]) == 2 for r in skips) and not any("loss" in r for r in records)
    assert not (d.run_dir / "summary.json").exists()


def test_a_single_non_finite_step_is_skipped_and_training_goes_on(tiny_run_config, tmp_path, monkeypatch):
    raw, _ = _recipe(tiny_run_config, tmp_path, "recovers")
    raw["training"].update(max_steps=4, max_consecutive_skips=2)
    step = Distiller.train_step

    def bad_second_step(self, mb):
        if self.state.step != 1:
            return step(self, mb)
        old = _poison(self, float("nan"))
        try:
            return step(self, mb)
        finally:
            _poison(self, old)

    monkeypatch.setattr(Distiller, "train_step", bad_second_step)
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    d.train()
    assert d.state.skipped_steps == 1 and d.state.consecutive_skips == 0
    assert all(torch.isfinite(v).all() for v in d.hf_student.state_dict().values())
    assert _trained_steps(d.run_dir) == [1, 3, 4]
    assert (d.run_dir / "summary.json").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_run_config, tmp_path, monkeypatch, capsys):
    """The checkpoint of step 4 hits ENOSPC half-way: one line, a non-zero exit, the partial copy removed,
    step 2 still complete -- and resuming (space freed) finishes the run."""
    import errno

    raw, recipe = _recipe(tiny_run_config, tmp_path, "full")
    raw["training"].update(max_steps=6, save_every=2)
    run = Path(raw["training"]["output_dir"])
    recipe.write_text(json.dumps(raw))
    original = Accelerator.save_state

    def full_disk(self, output_dir=None, **kwargs):
        if "step-00000004" in str(output_dir):
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)  # a partial write
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    assert main(["distill", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "step-00000002" in err[0]
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-00000002"]  # no partial step-4 left behind
    assert checkpoint.problem(ckpts / "step-00000002") is None
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(Accelerator, "save_state", original)
    assert main(["distill", "--config", str(recipe)]) == 0  # resumes from step 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_loss_scaler_skips_are_counted_and_leave_schedule_and_ema_alone(
    tiny_run_config, tmp_path, monkeypatch
):
    """fp16 loss scaling skips an overflowing step inside optimizer.step(); Accelerate reports it via
    optimizer_step_was_skipped. This CPU has no fp16 scaler, so the report is forced for step 2: the step
    is counted apart from non-finite skips, and neither the LR schedule nor the EMA advance."""
    calls = {"n": 0}

    def was_skipped(self):
        calls["n"] += 1
        return calls["n"] == 2

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(was_skipped))
    raw, _ = _recipe(tiny_run_config, tmp_path, "scaler")
    raw["training"].update(max_steps=3, save_every=0, ema=True)
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    d.train()
    assert d.state.scaler_skipped_steps == 1 and d.state.skipped_steps == 0
    assert d.scheduler.scheduler.last_epoch == 2 and d.ema.updates == 2  # 3 steps, one skipped by the scaler
    lines = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["scaler_skipped_steps"] for r in lines] == [0, 1, 1]
