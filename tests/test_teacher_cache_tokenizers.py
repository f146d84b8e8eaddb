"""One cache, students with other tokenizers: the cache is keyed to the teacher's tokens and their character
ends, and training from it aligns and projects exactly like online cross-tokenizer KD.

* A student tokenizer that cuts text like the teacher's but numbers its tokens differently: training from
  the cache (k = V) equals online cross-tokenizer KD, step by step and in the final weights.
* A student tokenizer that cuts text differently (its tokens are longer: the chain rule is exercised):
  for a student block whose text lies inside one cached teacher block, the objective from the cache equals
  the objective from an online teacher forward over that teacher block (loss and gradient).
* The other stored modes (top-k, sampled) and the router probabilities.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sakd.align.positions import align_spans
from sakd.cli import main
from sakd.data import split_documents
from sakd.models import load_model
from sakd.models.forward import hidden_and_head
from sakd.teacher.cache.blocks import token_blocks
from sakd.teacher.cache.manifest import read_manifest
from sakd.teacher.cache.reader import CacheReader
from sakd.teacher.signal import OnlineTeacher
from sakd.training.builders import build_objective

pytestmark = pytest.mark.integration


def _cache(raw: dict, out: Path, *overrides: str) -> Path:
    recipe = out.with_suffix(".json")
    recipe.write_text(json.dumps(raw))
    assert main(["cache-teacher", "--config", str(recipe), "--output", str(out), *overrides]) == 0
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.fixture(scope="module")
def base(tiny_run_config_module, tmp_path_factory) -> dict:
    raw = copy.deepcopy(tiny_run_config_module)
    raw["data"]["max_train_blocks"] = 48
    raw["distillation"]["cache"] = {"mode": "topk_tail", "blocks_per_shard": 16, "batch_size": 8}
    raw["distillation"]["alignment"] = {"cache_dir": str(tmp_path_factory.mktemp("vocab_maps"))}
    raw["training"]["output_dir"] = str(tmp_path_factory.mktemp("runs") / "run")
    return raw


@pytest.fixture(scope="module")
def other_tokenizer_dir(corpus, tmp_path_factory) -> Path:
    from sakd.commands.demo import train_tokenizer

    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok300") / "tokenizer", 300)


def test_one_cache_serves_students_with_several_tokenizers(
    base, permuted_tokenizer_dir, other_tokenizer_dir, make_distiller, tmp_path
):
    """Training from a k = V cache equals online cross-tokenizer KD for a student whose tokenizer cuts like
    the teacher's but numbers tokens differently; the same cache then trains students with the teacher's
    own tokenizer and with one that cuts the text differently."""
    raw = copy.deepcopy(base)
    vocab = len(json.loads((permuted_tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    cache = _cache(
        raw,
        tmp_path / "cache",
        f"distillation.cache.top_k={vocab}",
        "distillation.cache.values_dtype=float32",
    )
    raw["model"]["teacher_tokenizer"] = raw["model"]["tokenizer"]
    raw["model"]["tokenizer"] = str(permuted_tokenizer_dir)
    runs = {}
    for name, teacher_cache in (("online", None), ("cached", str(cache))):
        r = copy.deepcopy(raw)
        r["distillation"]["teacher_cache"] = teacher_cache
        d = make_distiller(r, output_dir=str(tmp_path / name))
        assert d.alignment.differ and d.alignment.teacher_to_student is not None
        d.train()
        runs[name] = (
            _metrics(tmp_path / name),
            load_file(str(tmp_path / name / "final" / "model.safetensors")),
        )
    assert d.teacher is None and d.cfg.distillation.loss.sparse == "topk_tail"
    for a, b in zip(runs["online"][0], runs["cached"][0], strict=True):
        assert b["kd_positions"] == a["kd_positions"] == 1.0  # same cuts: every position anchored
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["kd"] == pytest.approx(a["kd"], rel=1e-5)
    for k, v in runs["online"][1].items():
        torch.testing.assert_close(runs["cached"][1][k], v, rtol=0, atol=2e-6)
    # the same cache serves a student with the teacher's own tokenizer (its blocks) and one that cuts the
    # text differently (a 300-token vocabulary: aligned by character ends)
    for name, tokenizer in (("same", base["model"]["tokenizer"]), ("other", str(other_tokenizer_dir))):
        r = copy.deepcopy(raw)
        r["model"]["tokenizer"] = tokenizer
        r["distillation"]["teacher_cache"] = str(cache)
        d = make_distiller(r, output_dir=str(tmp_path / name), max_steps=2)
        assert (d.teacher_signal.index is None) == (name == "same") and d.teacher is None
        d.train()
        steps = _metrics(tmp_path / name)
        assert len(steps) == 2 and all(s["kd"] > 0 for s in steps)
        assert ("kd_positions" in steps[0]) == (name == "other")


@pytest.fixture(scope="module")
def coarse_student(base, other_tokenizer_dir, tmp_path_factory):
    """Teacher with a 300-token vocabulary (its tokens are shorter), student with the 384-token one; the
    cache's teacher blocks are 128 tokens long, the student's 32."""
    tmp = tmp_path_factory.mktemp("coarse")
    teacher_tok = other_tokenizer_dir
    raw = copy.deepcopy(base)
    raw["model"]["teacher_tokenizer"] = str(teacher_tok)
    raw["data"].update(block_size=128, max_train_blocks=24)
    vocab = len(json.loads((teacher_tok / "tokenizer.json").read_text())["model"]["vocab"])
    cache = _cache(
        raw, tmp / "cache", f"distillation.cache.top_k={vocab}", "distillation.cache.values_dtype=float32"
    )
    raw["data"].update(block_size=32, max_train_blocks=40)
    raw["distillation"]["teacher_cache"] = str(cache)
    return raw, cache, teacher_tok


def test_cross_tokenizer_objective_from_a_cache_equals_online_on_the_same_teacher_text(
    coarse_student, make_distiller
):
    raw, cache, teacher_tok = coarse_student
    d = make_distiller(raw)
    assert d.alignment.differ and d.teacher is None and d.teacher_signal.index is not None
    assert d.alignment.stats["anchored"] > 0.3 and d.alignment.stats["multi_token"] > 0.05
    reader = CacheReader(cache, read_manifest(cache))
    bounds = reader.bounds()
    docs, _ = split_documents(d.cfg.data, d.cfg.training.seed)
    student_blocks = token_blocks(docs, d.tokenizer, 32)
    teacher = load_model("tiny-moe", tokenizer=d.alignment.teacher_tokenizer, seed=1).eval()
    online = OnlineTeacher(teacher, aligned=True)
    dense = copy.deepcopy(d.cfg)
    dense.distillation.loss.sparse = "none"  # online: the full distribution (the run resolved topk_tail)
    online_objective = build_objective(dense, d.vocab_size, d.alignment, None)
    compared = chained = 0
    for i in range(len(d.data.train)):
        lo, ends = student_blocks[i]["char_base"], student_blocks[i]["char_end"]
        inside = (bounds["char_base"] <= lo) & (bounds["char_last"] >= ends[-1])
        if not bool(inside.any()) or compared == 3:
            continue
        w = int(inside.nonzero()[0])
        blk = reader.block(w)
        al = align_spans([(0, e) for e in ends], [(0, int(e)) for e in blk.char_end])
        batch = d.data.train_batch([i])
        reference = {
            **batch,
            "teacher_input_ids": blk.token_ids[None],
            "teacher_attention_mask": torch.ones_like(blk.token_ids[None]),
            "anchor": al.anchor[None],
            "span_end": al.span_end[None],
        }
        results = []
        for objective, signal, b in (
            (online_objective, online(reference), reference),
            (d.objective, d.teacher_signal(batch), batch),
        ):
            d.hf_student.zero_grad(set_to_none=True)
            student = hidden_and_head(d.hf_student, d.hf_student, batch["input_ids"], batch["attention_mask"])
            out = objective(student, signal, batch["labels"], temperature=2.0, batch=b)
            out.loss_sum.backward()
            grads = torch.cat([p.grad.reshape(-1) for p in d.hf_student.parameters() if p.grad is not None])
            results.append((out.loss_sum.detach(), out.component_sums["kd_positions"], grads))
        (ref_loss, ref_pos, ref_grad), (loss, pos, grad) = results
        assert pos == ref_pos and loss == pytest.approx(float(ref_loss), rel=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
        chained += int(((al.span_end > al.anchor + 1) & (al.anchor >= 0)).sum())
        compared += 1
    assert compared == 3 and chained > 0


def test_cross_tokenizer_run_from_a_cache_trains(coarse_student, make_distiller, tmp_path):
    raw, _, _ = coarse_student
    d = make_distiller(raw, output_dir=str(tmp_path / "run"), max_steps=3)
    summary = d.train()
    steps = _metrics(tmp_path / "run")
    assert len(steps) == 3 and all(0 < s["kd_positions"] <= 1 and s["kd"] > 0 for s in steps)
    assert summary["alignment"]["anchored"] == pytest.approx(d.alignment.stats["anchored"])


@pytest.mark.parametrize("mode, loss_mode", [("topk", "subset"), ("sampled", "sampled")])
def test_other_stored_modes_train(base, make_distiller, tmp_path, mode, loss_mode):
    raw = copy.deepcopy(base)
    cache = _cache(
        raw,
        tmp_path / "cache",
        f"distillation.cache.mode={mode}",
        "distillation.cache.top_k=8",
        "distillation.cache.num_samples=8",
    )
    manifest = read_manifest(cache)
    per_token = manifest["totals"]["bytes_per_token"]
    # 8 slots of a 2-byte value + 9-bit id (+ a 1-byte count), per position 2-byte char end + next log-prob
    # (+ a 1-byte slot count), the 9-bit token id, and the safetensors header shared by the shard's positions
    assert manifest["signal"]["mode"] == mode and per_token < 8 * (2 + 9 / 8 + (mode == "sampled")) + 12
    raw["distillation"]["teacher_cache"] = str(cache)
    d = make_distiller(raw, output_dir=str(tmp_path / "run"), max_steps=2)
    d.train()
    assert d.cfg.distillation.loss.sparse == loss_mode
    steps = _metrics(tmp_path / "run")
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)


def test_router_probabilities_are_stored(base, tmp_path):
    """The tiny MoE teacher's router probabilities per layer and position, as its own router computes them."""
    raw = copy.deepcopy(base)
    raw["data"]["max_train_blocks"] = 4
    cache = _cache(
        raw, tmp_path / "cache", "distillation.cache.router=true", "distillation.cache.values_dtype=float32"
    )
    reader = CacheReader(cache, read_manifest(cache))
    assert reader.spec.router_shape == [4, 4]
    blk = reader.block(2)
    from sakd.models import load_tokenizer

    teacher = load_model("tiny-moe", tokenizer=load_tokenizer(raw["model"]["tokenizer"]), seed=1).eval()
    with torch.no_grad():
        logits = teacher(input_ids=blk.token_ids[None], output_router_logits=True).router_logits
    want = torch.stack([torch.softmax(x.float(), -1) for x in logits], dim=1)  # [L, layers, experts]
    torch.testing.assert_close(blk.router, want, atol=1e-5, rtol=0)
