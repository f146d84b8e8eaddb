"""End to end across tokenizers: a Qwen3-MoE teacher and a Llama student that tokenize differently."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sakd.cli import main
from sakd.commands.demo import train_tokenizer
from sakd.models.presets import build_preset_config

AUX = {
    "alignment": {"uld_weight": 0.1},
    "feature": {"weight": 1.0},
    "attention": {"weight": 1.0},
    "contrastive": {"weight": 0.1},
}


@pytest.fixture(scope="module")
def teacher_tokenizer_dir(corpus, tmp_path_factory):
    """A smaller vocabulary than the student's (tokenizer_dir, 384): student tokens are often
    spelt by several teacher tokens, so the chain rule is exercised."""
    return train_tokenizer(corpus, tmp_path_factory.mktemp("ttok") / "teacher_tok", 300)


def _cross(raw, teacher_tok, tmp_path, **distillation):
    raw = copy.deepcopy(raw)
    raw["model"]["teacher_tokenizer"] = str(teacher_tok)
    raw["distillation"].update(copy.deepcopy(distillation))
    raw["distillation"].setdefault("alignment", {})["cache_dir"] = str(tmp_path / "vocab_maps")
    return raw


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_identical_tokenizers_aligned_path_equals_plain_kd(tiny_run_config, make_distiller, tmp_path):
    """alignment.mode=always with one tokenizer goes through the anchors/gather path: same losses and
    weights, bit for bit, as plain KD."""
    results = {}
    for mode in ("auto", "always"):
        raw = copy.deepcopy(tiny_run_config)
        raw["distillation"]["alignment"] = {"mode": mode}
        d = make_distiller(raw, output_dir=str(tmp_path / mode), max_steps=3)
        assert d.alignment.aligned == (mode == "always")
        if mode == "always":
            batch = d.data.train_batch([0, 1])
            assert torch.equal(batch["anchor"][0], torch.arange(batch["input_ids"].shape[1]))
            assert torch.equal(batch["teacher_input_ids"], batch["input_ids"])
        d.train()
        weights = {k: v.clone() for k, v in d.hf_student.state_dict().items()}
        results[mode] = ([(m.get("loss"), m.get("kd"), m.get("ce")) for m in _metrics(d.run_dir)], weights)
    assert results["auto"][0] == results["always"][0]
    for k, v in results["auto"][1].items():
        assert torch.equal(v, results["always"][1][k]), k


def test_cross_tokenizer_distill_with_all_aux_losses(
    tiny_run_config, make_distiller, teacher_tokenizer_dir, tmp_path
):
    raw = _cross(tiny_run_config, teacher_tokenizer_dir, tmp_path, **AUX)
    d = make_distiller(raw, max_steps=3, save_every=2)
    assert d.alignment.aligned and d.alignment.vocab_map is not None
    # attention transfer needs one-to-one positions: disabled across tokenizers
    assert (
        d.aux_terms is not None
        and "attention" not in d.aux_terms.terms
        and "contrastive" in d.aux_terms.terms
    )
    before = {k: v.clone() for k, v in d.aux_terms.state_dict().items()}
    summary = d.train()
    m = _metrics(d.run_dir)
    steps = [r for r in m if "kd" in r]
    assert all(0 < r["kd_positions"] <= 1 and r["feature"] > 0 and "contrastive" in r for r in steps)
    # the projections learn
    after = d.aux_terms.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    al = json.loads((d.run_dir / "summary.json").read_text())["alignment"]
    assert al["student_vocab"] == len(d.tokenizer) and al["teacher_vocab"] == len(
        d.alignment.teacher_tokenizer
    )
    assert 0 < al["student_coverage"] <= 1 and 0 < al["anchored"] <= 1 and al["multi_token"] > 0
    assert 0 < al["teacher_mass_mapped"] <= 1 + 1e-6
    assert 0 <= summary["teacher_agreement"] <= 1
    assert summary["eval_ppl"] > 1
    # projections are checkpointed, never exported
    ckpt = d.run_dir / "checkpoints" / "step-00000002"
    saved = load_file(str(ckpt / "model.safetensors"))
    aux_keys = {k for k in saved if k.startswith("aux.")}
    assert aux_keys == {f"aux.{k}" for k in d.aux_terms.state_dict()}
    exported = load_file(str(d.run_dir / "final" / "model.safetensors"))
    student_keys = set(d.hf_student.state_dict())
    assert set(exported) <= student_keys and not any(
        k.startswith(("feature_proj", "contrastive")) for k in exported
    )


def test_cross_tokenizer_resume_is_exact(tiny_run_config, make_distiller, teacher_tokenizer_dir, tmp_path):
    """2 steps + resume + 2 == 4 uninterrupted, with the projections and the chain rule in play."""
    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    raw = _cross(
        tiny_run_config, teacher_tokenizer_dir, tmp_path, feature={"weight": 1.0}, contrastive={"weight": 0.1}
    )
    raw["training"].update(max_steps=4, save_every=2, keep_last_n=5)
    full = tmp_path / "full"
    make_distiller(raw, output_dir=str(full)).train()
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    raw["training"]["output_dir"] = str(resumed)
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="auto")
    assert d.state.step == 2
    d.train()
    a, b = (
        load_file(str(r / "checkpoints" / "step-00000004" / "model.safetensors")) for r in (full, resumed)
    )
    assert any(k.startswith("aux.") for k in a)  # the projections resume too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_chain_rule_changes_the_kd_term(tiny_run_config, make_distiller, teacher_tokenizer_dir, tmp_path):
    losses = {}
    for chain in (True, False):
        raw = _cross(tiny_run_config, teacher_tokenizer_dir, tmp_path, alignment={"chain_rule": chain})
        d = make_distiller(raw, output_dir=str(tmp_path / f"c{chain}"), max_steps=1)
        d.train()
        losses[chain] = _metrics(d.run_dir)[0]["kd"]
    assert losses[True] != losses[False]


def test_attention_transfer_same_tokenizer(tiny_run_config, make_distiller):
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"].update(attention={"weight": 1.0, "layers": [0, -1]})
    d = make_distiller(raw, max_steps=2)
    assert d.aux_terms.terms["attention"].pairs == [
        (0, 1),
        (1, 3),
    ]  # 2 student layers <- 4 teacher layers, uniformly
    before = d.aux_terms.terms["attention"].proj.weight.clone()
    d.train()
    steps = [r for r in _metrics(d.run_dir) if "attention" in r]
    assert len(steps) == 2 and all(r["attention"] > 0 for r in steps)
    assert not torch.equal(before, d.aux_terms.terms["attention"].proj.weight)


def test_real_architectures_one_step(corpus, tokenizer_dir, teacher_tokenizer_dir, tmp_path):
    """The real presets' architectures (Huihui-MoE dims, SmolLM dims; fewer layers to stay fast) run one
    `sakd distill` step across tokenizers with the auxiliary losses on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = {}
    for name, preset, tok, layers in (
        ("teacher", "huihui-moe-1.2b", teacher_tokenizer_dir, 2),
        ("student", "smollm-135m", tokenizer_dir, 2),
    ):
        t = AutoTokenizer.from_pretrained(tok)
        cfg = build_preset_config(
            preset, vocab_size=len(t), eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id
        )
        cfg.num_hidden_layers = layers
        if hasattr(cfg, "layer_types"):
            cfg.layer_types = cfg.layer_types[:layers] if cfg.layer_types else None
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(tmp_path / name)
        t.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    raw = {
        "model": {"teacher": str(dirs["teacher"]), "student": str(dirs["student"])},
        "data": {"train": str(corpus), "block_size": 32, "max_eval_blocks": 2},
        "distillation": {"loss": {"alpha": 0.5, "chunk_size": 32}, **copy.deepcopy(AUX)},
        "training": {"output_dir": str(tmp_path / "run"), "batch_size": 2, "max_steps": 1, "eval_every": 0},
        "logging": {"progress_bar": False, "log_every": 1},
    }
    raw["distillation"]["alignment"]["cache_dir"] = str(tmp_path / "vm")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe)]) == 0
    record = _metrics(tmp_path / "run")[0]
    assert (
        record["feature"] > 0 and record["kd_positions"] > 0 and torch.isfinite(torch.tensor(record["loss"]))
    )
    assert "alignment" in json.loads((tmp_path / "run" / "summary.json").read_text())
