"""EMA of the student's weights: the average itself, evaluation and export of it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sakd.cli import main
from sakd.evaluation.heldout import evaluate
from sakd.models.student import student_state
from sakd.training.ema import EMA_FILE

pytestmark = pytest.mark.integration


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def test_ema_equals_a_hand_computed_average_and_ignores_skipped_steps(make_distiller, tiny_run_config):
    decay, warmup = 0.6, 3  # warm-up decays 0.5, then the 0.6 cap: both branches are exercised
    d = make_distiller(tiny_run_config, ema=True, ema_decay=decay, ema_warmup_steps=warmup)
    student = d.hf_student
    ref = _params(student)  # the average starts at the initial weights
    assert d.ema.updates == 0 and all(torch.equal(d.ema.tensors()[k], ref[k]) for k in ref)
    for k in range(1, 5):
        d.train_step(d._micro_batches())
        d.state.step_in_epoch += 1
        w = _params(student)
        dk = min(decay, (1 + k) / (warmup + k))
        ref = {n: dk * ref[n] + (1 - dk) * w[n] for n in ref}
        assert d.ema.updates == k
        ema = d.ema.tensors()
        assert ema.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(ema[n], ref[n], rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema["model.embed_tokens.weight"], w["model.embed_tokens.weight"])  # it lags

    # A step skipped for a non-finite loss leaves the average alone.
    emb = student.get_output_embeddings().weight
    with torch.no_grad():
        old, emb[0, 0] = float(emb[0, 0]), float("inf")
    metrics = d.train_step(d._micro_batches())
    with torch.no_grad():
        emb[0, 0] = old
    assert "skipped_sample_ids" in metrics and d.ema.updates == 4
    assert all(torch.equal(d.ema.tensors()[n], ema[n]) for n in ema)


def test_evaluation_uses_the_ema_when_configured(make_distiller, tiny_run_config):
    d = make_distiller(tiny_run_config, ema=True, ema_decay=0.9)
    for _ in range(2):
        d.train_step(d._micro_batches())
    student = d.hf_student
    kw = {"batch_size": 8, "vocab_size": d.vocab_size, "teacher": d.teacher, "chunk_size": 40, "window": 32}
    of_ema, of_raw = evaluate(d.ema.module, d.data.heldout(), **kw), evaluate(student, d.data.heldout(), **kw)
    assert of_ema["loss"] != of_raw["loss"]
    assert d.cfg.training.eval_with_ema  # the default
    assert d.evaluate()["loss"] == pytest.approx(of_ema["loss"], rel=1e-6)
    d.cfg.training.eval_with_ema = False
    assert d.evaluate()["loss"] == pytest.approx(of_raw["loss"], rel=1e-6)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("export_ema", [True, False])
def test_final_and_export_pick_ema_or_raw_weights(
    make_distiller, tiny_run_config, tmp_path, capsys, export_ema
):
    d = make_distiller(tiny_run_config, ema=True, ema_decay=0.9, export_ema=export_ema, max_steps=3)
    summary = d.train()
    run = d.run_dir
    ckpt = run / "checkpoints" / "step-00000003"
    ema, raw = load_file(str(ckpt / EMA_FILE)), student_state(load_file(str(ckpt / "model.safetensors")))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert not _equal(ema, raw)
    assert _equal(final, ema if export_ema else raw)
    assert summary["final_weights"] == ("ema" if export_ema else "raw")
    assert summary["stop_reason"] == "max_steps" and "best_step" not in summary  # no early stopping
    assert json.loads((run / "summary.json").read_text())["final_weights"] == summary["final_weights"]

    capsys.readouterr()
    assert main(["export", str(run), "--output", str(tmp_path / "default")]) == 0
    assert main(["export", str(run), "--output", str(tmp_path / "raw"), "--raw"]) == 0
    assert _equal(load_file(str(tmp_path / "default" / "model.safetensors")), final)
    assert _equal(load_file(str(tmp_path / "raw" / "model.safetensors")), raw)
