"""The loop on tiny models: token-normalized accumulation, exact resume, run directory, export."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.cli import main
from sakd.config import load_config
from sakd.data import make_batch
from sakd.training.trainer import Distiller

pytestmark = pytest.mark.integration


def _ragged_batches(d: Distiller, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` blocks with a different number of ignored labels in each (so token counts differ)."""
    ids = d.data.train[list(range(n))]["input_ids"]
    batch = make_batch(ids, list(range(n)))
    for i in range(n):
        batch["labels"][i, : 3 * i + 1] = -100
    return [batch]


def _split(batch: dict[str, torch.Tensor], micro: int) -> list[dict[str, torch.Tensor]]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + micro] for k, v in batch.items()} for i in range(0, n, micro)]


def _reference_loss(
    d: Distiller, batch: dict[str, torch.Tensor], alpha: float, temperature: float
) -> torch.Tensor:
    """alpha*T^2*KL(teacher||student) + (1-alpha)*CE, mean over valid tokens, from full logits (independent)."""
    student = d.hf_student
    logits = student(input_ids=batch["input_ids"]).logits[:, :-1].float()
    with torch.no_grad():
        t_logits = d.teacher(input_ids=batch["input_ids"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    log_q = F.log_softmax(logits / temperature, -1)
    p = F.softmax(t_logits / temperature, -1)
    kl = (p * (p.clamp_min(1e-30).log() - log_q)).sum(-1)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    n = valid.sum()
    return alpha * temperature**2 * (kl * valid).sum() / n + (1 - alpha) * (ce * valid).sum() / n


@pytest.mark.parametrize("fused", [True, False])
def test_accumulation_split_gives_the_same_update(make_distiller, tiny_run_config, fused):
    """1 micro-batch of 8 and 4 micro-batches of 2 give the gradient of the mean over all valid tokens."""
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"]["fused"] = fused
    raw["optimization"]["max_grad_norm"] = 1e9  # clip_grad_norm_ then just reports the pre-clip norm
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        d = make_distiller(raw, batch_size=micro, gradient_accumulation_steps=accum)
        (batch,) = _ragged_batches(d, 8)
        ref = _reference_loss(d, batch, alpha=0.5, temperature=2.0)
        ref.backward()
        student = d.hf_student
        ref_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in student.parameters() if p.grad is not None])
        )
        student.zero_grad(set_to_none=True)
        metrics = d.train_step(_split(batch, micro))
        assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(ref_norm.item(), rel=1e-4)
        assert metrics["tokens"] == int((batch["labels"][:, 1:] != -100).sum())
        results.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("ema", [False, True])
def test_resume_is_bitwise_identical(make_distiller, tiny_run_config, tmp_path, ema):
    """3 steps + resume + 3 steps == 6 steps: the weights, final/ and (with ema) the EMA, bit for bit."""
    raw = copy.deepcopy(tiny_run_config)
    raw["training"].update(
        max_steps=6, save_every=3, keep_last_n=5, gradient_accumulation_steps=2, batch_size=2, ema=ema
    )
    raw["training"]["ema_decay"] = 0.9
    raw["distillation"]["loss"].update(temperature_schedule="linear", min_temperature=1.0)
    full = tmp_path / "full"
    make_distiller(raw, output_dir=str(full)).train()

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    raw["training"]["output_dir"] = str(resumed)
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="auto")
    assert d.state.step == 3 and d.state.micro_step == 6
    assert (d.ema.updates == 3) if ema else d.ema is None
    d.train()

    a, b = _final_weights(full), _final_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (full / "checkpoints" / "step-00000006" / "ema.safetensors").exists() == ema
    for name in ["model.safetensors", "ema.safetensors"] if ema else ["model.safetensors"]:
        a, b = (load_file(str(r / "checkpoints" / "step-00000006" / name)) for r in (full, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    lines = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no duplicated steps


def test_distill_run_directory_and_export_roundtrip(tiny_run_config, tmp_path, capsys):
    raw = copy.deepcopy(tiny_run_config)
    raw["training"].update(max_steps=12, eval_every=6, batch_size=8)
    raw["optimization"]["learning_rate"] = 3e-3
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe), "training.seed=1"]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "checkpoints", "final", "summary.json"):
        assert (run / name).exists(), name
    resolved, _ = load_config(run / "config.yaml")
    assert resolved.training.seed == 1 and resolved.training.max_steps == 12
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert {"kd", "ce", "lr", "tokens_per_s", "grad_norm", "temperature"} <= train[0].keys()
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12] and all(r["eval_ppl"] < 1e6 for r in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 12 and 0 <= summary["teacher_agreement"] <= 1

    out = tmp_path / "exported"
    capsys.readouterr()
    assert main(["export", str(run), "--output", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Somebody lives in", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, final(ids).logits, rtol=0, atol=0)
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 5
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_ce_only_run_needs_no_teacher(make_distiller, tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"]["alpha"] = 0.0
    raw["model"]["teacher"] = "/nonexistent/teacher"  # never loaded
    d = make_distiller(raw)
    assert d.teacher is None
    summary = d.train()
    assert "teacher_agreement" not in summary


@pytest.mark.parametrize("sparse", ["subset", "topk_tail", "sampled"])
def test_sparse_teacher_modes_train(make_distiller, tiny_run_config, sparse):
    """The seed's kd_top_k (subset) and the better sparse signals go through the trainer's fused path."""
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"].update(sparse=sparse, kd_top_k=16, num_samples=8)
    d = make_distiller(raw, max_steps=3)
    summary = d.train()
    records = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in records if "kd" in r]
    assert len(kd) == 3 and all(k >= 0 and k == k for k in kd) and kd[0] > 0
    assert summary["eval_ppl"] < 1e6


def test_the_step_is_one_update_whatever_its_number_of_micro_batches(
    tiny_run_config, make_distiller, tmp_path
):
    """The step decides which micro-batch is its last from the batches it is given, not from
    Accelerate's counter of ``gradient_accumulation_steps``: three micro-batches given to a run set up
    for two accumulate into one update, the same as a run set up for three."""
    a = make_distiller(tiny_run_config, output_dir=str(tmp_path / "a"), gradient_accumulation_steps=3)
    micro_batches = a._micro_batches()
    assert len(micro_batches) == 3
    a.train_step(micro_batches)
    b = make_distiller(tiny_run_config, output_dir=str(tmp_path / "b"), gradient_accumulation_steps=2)
    metrics = b.train_step(micro_batches)
    assert metrics["micro_batches"] == 3 and b.scheduler.scheduler.last_epoch == 1
    for (name, pa), pb in zip(a.hf_student.named_parameters(), b.hf_student.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7, msg=name)
