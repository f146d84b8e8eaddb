"""Early stopping on the held-out loss: where it stops, what it keeps and exports, what it reports."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from sakd.config import load_config
from sakd.models.student import student_state
from sakd.training import checkpoint
from sakd.training.trainer import Distiller

pytestmark = pytest.mark.integration


def test_early_stopping_stops_keeps_and_exports_the_best_checkpoint(tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    # A huge min_delta: no evaluation after the first counts as an improvement.
    raw["training"].update(
        max_steps=6, eval_every=1, keep_last_n=1, early_stopping_patience=1, early_stopping_min_delta=1e9
    )
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    summary = d.train()

    assert d.state.step == 2  # step 1 is the best; step 2 does not improve; patience 1
    assert summary["stop_reason"] == "early_stopping" and summary["best_step"] == 1
    assert json.loads((d.run_dir / "summary.json").read_text()) == summary
    records = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 2]  # periodic evaluations, then the final one
    assert summary["best_eval_loss"] == evals[0]["eval_loss"]

    ckpts = d.run_dir / "checkpoints"
    assert [p.name for p in checkpoint.list_complete(ckpts)] == [
        "step-00000001",
        "step-00000002",
    ]  # best kept
    state = json.loads((ckpts / "step-00000002" / checkpoint.STATE_FILE).read_text())
    assert (state["stop_reason"], state["best_step"]) == ("early_stopping", 1)
    best = student_state(load_file(str(ckpts / "step-00000001" / "model.safetensors")))
    last = student_state(load_file(str(ckpts / "step-00000002" / "model.safetensors")))
    final = load_file(str(d.run_dir / "final" / "model.safetensors"))
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(last[k], best[k]) for k in best)

    # Running it again resumes a finished, early-stopped run: it stays stopped where it was.
    again = Distiller(cfg, resume="auto").train()
    assert again["steps"] == 2 and again["stop_reason"] == "early_stopping"
