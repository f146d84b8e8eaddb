"""PEFT students (``model.peft``): only the adapters train, resume is exact, ``final/`` and ``sakd export``
hold the merged model (plain transformers loads it), ``--adapter`` the adapter alone, QLoRA is refused
without CUDA. The distributed launch modes are in tests/test_peft_distributed.py."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.cli import main
from sakd.config import PeftConfig, load_config
from sakd.models import load_model, load_tokenizer
from sakd.models.peft import is_adapter_parameter, reset_trainable, wrap_student
from sakd.training.trainer import Distiller

pytestmark = pytest.mark.integration


def _lora(tiny_run_config: dict, **peft) -> dict:
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["peft"] = {"method": "lora", "rank": 4, "alpha": 8.0, **peft}
    raw["optimization"]["learning_rate"] = 1e-2
    return raw


def _base(tokenizer_dir, seed: int = 0):
    """The run's student before training: the preset's seeded initialisation (the frozen base)."""
    return load_model("tiny-dense", tokenizer=load_tokenizer(str(tokenizer_dir)), seed=seed)


@pytest.mark.parametrize(
    "peft",
    [
        {"method": "lora"},
        {"method": "dora", "target_modules": ["q_proj", "v_proj"]},
        {"method": "lora", "modules_to_save": ["lm_head"], "target_modules": ["down_proj"]},
    ],
)
def test_only_the_adapters_train_and_the_rule_matches_peft(tokenizer_dir, peft):
    """peft's own trainable set (requires_grad after get_peft_model) is what is_adapter_parameter names,
    so a training stage that resets the trainable set keeps the base frozen."""
    pcfg = PeftConfig(**{**peft, "rank": 4})
    model = wrap_student(_base(tokenizer_dir), pcfg, gradient_checkpointing=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in model.named_parameters() if is_adapter_parameter(n)}
    model.requires_grad_(True)
    reset_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    if pcfg.method == "dora":
        assert any("lora_magnitude_vector" in n for n in trainable)
    if pcfg.modules_to_save:
        assert any(".modules_to_save." in n for n in trainable)


def test_lora_trains_the_adapters_and_leaves_the_base(make_distiller, tiny_run_config, tokenizer_dir):
    d = make_distiller(_lora(tiny_run_config), max_steps=3)
    groups = d.optimizer.param_groups
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in d.hf_student.parameters() if p.requires_grad
    )
    d.train()
    base = _base(tokenizer_dir).state_dict()
    changed = []
    for name, p in d.hf_student.named_parameters():
        if is_adapter_parameter(name):
            changed.append(name)
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), base[key]), name  # the base is frozen
    lora_b = [n for n in changed if "lora_B" in n]  # B starts at zero: moved means trained
    assert lora_b and all(dict(d.hf_student.named_parameters())[n].abs().sum() > 0 for n in lora_b)


def test_gradient_checkpointing_still_trains_every_layers_adapters(make_distiller, tiny_run_config):
    raw = _lora(tiny_run_config)
    raw["model"]["gradient_checkpointing"] = True
    raw["optimization"]["warmup_steps"] = 0  # the first step takes a non-zero learning rate
    d = make_distiller(raw, max_steps=1)
    d.train_step(d._micro_batches())
    for name, p in d.hf_student.named_parameters():
        if "lora_B" in name:
            assert p.abs().sum() > 0, name


def test_lora_resume_is_bitwise_identical(make_distiller, tiny_run_config, tmp_path):
    raw = _lora(tiny_run_config)
    raw["training"].update(max_steps=4, save_every=2, keep_last_n=5, batch_size=2)
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
    for name in ("final/model.safetensors", "checkpoints/step-00000004/model.safetensors"):
        a, b = (load_file(str(r / name)) for r in (full, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_export_merged_and_adapter_alone_agree_with_the_base_plus_adapter(
    tiny_run_config, tokenizer_dir, tmp_path, capsys
):
    """``sakd export`` writes the merged student (plain AutoModelForCausalLM, the base's parameter names);
    ``--adapter`` the adapter, which peft puts on the untouched base: both give the same logits, as does
    ``final/``, and they differ from the base's (the adapters learned something)."""
    from peft import PeftModel

    raw = _lora(tiny_run_config)
    raw["training"]["max_steps"] = 3
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe)]) == 0
    run = tmp_path / "run"
    assert (run / "student_config" / "adapter" / "adapter_config.json").is_file()
    assert main(["export", str(run), "--output", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), "--output", str(tmp_path / "adapter"), "--adapter"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    assert set(merged.state_dict()) == set(_base(tokenizer_dir).state_dict())
    adapted = PeftModel.from_pretrained(_base(tokenizer_dir), tmp_path / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tok("Somebody lives in the city", return_tensors="pt").input_ids
    with torch.no_grad():
        want = adapted(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(final(ids).logits, want, rtol=0, atol=1e-5)
        assert (want - _base(tokenizer_dir)(ids).logits).abs().max() > 1e-3
    assert merged.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_adapter_export_of_a_full_run_is_refused(tiny_run_config, tmp_path, capsys):
    raw = copy.deepcopy(tiny_run_config)
    raw["training"]["max_steps"] = 1
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--output", str(tmp_path / "a"), "--adapter"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained no adapters" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_is_refused_on_cpu_in_one_line(tiny_run_config, tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(_lora(tiny_run_config, quantize_base="4bit")))
    assert main(["distill", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA GPU" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_stages_with_adapters_never_unfreeze_the_base(make_distiller, tiny_run_config):
    """A stage that freezes lora_A and the next that trains everything: 'everything' is the adapters."""
    raw = _lora(tiny_run_config)
    raw["optimization"]["stages"] = [
        {"steps": 1, "lr_multipliers": {"lora_A": 0.0}},
        {"steps": 1},
    ]
    raw["training"]["max_steps"] = None
    d = make_distiller(raw)
    first = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    d.train()
    last = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in d.hf_student.named_parameters() if is_adapter_parameter(n)}
    lora_a = {id(p) for n, p in d.hf_student.named_parameters() if "lora_A" in n}
    assert first == adapters - lora_a and last == adapters


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_and_exports_merged_on_cuda(tiny_run_config, tmp_path):
    raw = _lora(tiny_run_config, quantize_base="4bit")
    raw["training"]["max_steps"] = 2
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    summary = d.train()
    assert summary["steps"] == 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert not hasattr(model.config, "quantization_config")
