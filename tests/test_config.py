import json
from pathlib import Path

import pytest
import yaml

from sakd.config import ConfigError, RunConfig, all_keys, dump_config, load_config
from sakd.config.legacy_keys import SEED_KEY_MAP, SEED_KEYS_NOT_YET_SUPPORTED
from sakd.config.reference import reference_markdown

RECIPES = sorted((Path(__file__).parents[1] / "sakd" / "recipes").glob("*.yaml"))


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg, notes = load_config({})
    assert cfg == RunConfig() and notes == []
    dump_config(cfg, tmp_path / "c.yaml")
    again, _ = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_overrides_are_typed():
    cfg, _ = load_config(
        {},
        [
            "training.max_steps=7",
            "optimization.learning_rate=1e-4",
            "distillation.loss.fused=false",
            "optimization.max_grad_norm=null",
        ],
    )
    assert cfg.training.max_steps == 7 and isinstance(cfg.training.max_steps, int)
    assert cfg.optimization.learning_rate == pytest.approx(1e-4)
    assert cfg.distillation.loss.fused is False
    assert cfg.optimization.max_grad_norm is None


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        (
            {"training": {"batchsize": 3}},
            [],
            "unknown config key 'training.batchsize' (did you mean 'training.batch_size'?)",
        ),
        ({"trainig": {}}, [], "did you mean 'training'"),
        ({}, ["optimization.lerning_rate=1"], "did you mean 'optimization.learning_rate'"),
        ({"optimization": {"learning_rate": -1}}, [], "'optimization.learning_rate' must be > 0"),
        ({"distillation": {"loss": {"temperature": 0}}}, [], "'distillation.loss.temperature' must be > 0"),
        ({"distillation": {"loss": {"alpha": 1.5}}}, [], "'distillation.loss.alpha' must be <= 1"),
        ({"training": {"ema_decay": 1.0}}, [], "'training.ema_decay' must be < 1"),
        ({"training": {"ema_decay": 0}}, [], "'training.ema_decay' must be > 0"),
        ({"training": {"early_stopping_patience": 2, "eval_every": 0}}, [], "needs training.eval_every > 0"),
        ({"distillation": {"loss": {"kind": "kll"}}}, [], "did you mean 'skl'"),
        ({"training": {"batch_size": 2.5}}, [], "must be an integer"),
        ({"training": {"batch_size": "many"}}, [], "must be an integer"),
        ({"distillation": {"loss": {"sparse": "subset"}}}, [], "needs distillation.loss.kd_top_k"),
        ({}, ["training.max_steps"], "must look like section.key=value"),
        ({"training": 3}, [], "must be a mapping"),
        (
            {"distillation": {"contrastive": {"weight": 0.1}}, "training": {"batch_size": 1}},
            [],
            "distillation.contrastive needs training.batch_size >= 2",
        ),
    ],
)
def test_bad_config_is_one_clear_line(raw, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(raw, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    badj = tmp_path / "bad.json"
    badj.write_text("{'single': quotes}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(badj)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


SEED_IMPROVED_CONFIG = {  # configs/improved_config.json of the old system, verbatim keys and values
    "teacher_model": "huihui-ai/Huihui-MoE-1B-A0.6B",
    "student_model": "HuggingFaceTB/SmolLM-135M",
    "batch_size": 4,
    "gradient_accumulation_steps": 8,
    "learning_rate": 3e-5,
    "num_epochs": 3,
    "warmup_steps": 1000,
    "eval_steps": 1000,
    "max_length": 384,
    "temperature": 3.0,
    "min_temperature": 2.0,
    "use_temperature_curriculum": True,
    "use_curriculum": True,
    "kd_top_k": 256,
    "early_stopping_patience": 10,
    "early_stopping_min_delta": 0.001,
    "memory_threshold": 0.85,
    "use_ema": True,
    "ema_decay": 0.995,
    "attention_layers": 2,
}


def test_seed_config_maps_and_reports_unsupported(tmp_path):
    path = tmp_path / "improved_config.json"
    path.write_text(json.dumps(SEED_IMPROVED_CONFIG))
    cfg, notes = load_config(path)
    assert cfg.model.teacher == "huihui-ai/Huihui-MoE-1B-A0.6B"
    assert cfg.model.student == "HuggingFaceTB/SmolLM-135M"
    assert (cfg.training.batch_size, cfg.training.gradient_accumulation_steps) == (4, 8)
    assert cfg.optimization.learning_rate == 3e-5 and cfg.optimization.warmup_steps == 1000
    assert cfg.training.num_epochs == 3 and cfg.training.eval_every == 1000
    assert cfg.data.block_size == 384
    loss = cfg.distillation.loss
    assert (loss.temperature, loss.min_temperature, loss.temperature_schedule) == (3.0, 2.0, "linear")
    assert (loss.sparse, loss.kd_top_k) == ("subset", 256)
    assert cfg.training.ema is True and cfg.training.ema_decay == 0.995
    reported = {n.split("'")[1] for n in notes}
    assert reported == {k for k in SEED_IMPROVED_CONFIG if k in SEED_KEYS_NOT_YET_SUPPORTED}
    assert (cfg.training.early_stopping_patience, cfg.training.early_stopping_min_delta) == (10, 0.001)
    assert reported == {"memory_threshold", "attention_layers"}
    assert cfg.distillation.curriculum.phases is True  # use_curriculum


def test_seed_keys_target_real_fields():
    keys = set(all_keys())
    assert set(SEED_KEY_MAP.values()) <= keys


def test_every_field_is_documented():
    ref = reference_markdown()
    for key in all_keys():
        assert f"`{key}`" in ref
    assert "| |" not in ref  # no empty help string


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load(recipe):
    cfg, _ = load_config(recipe)
    assert yaml.safe_load(recipe.read_text())  # non-empty
    assert cfg.training.output_dir


def test_recipes_exist():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "huihui-moe-1b-to-smollm-135m.yaml"}


def test_yaml_booleans_become_the_choice_they_were_written_as(tmp_path):
    """`mixed_precision: no` is False to YAML 1.1; a word-choice field takes it back as "no"."""
    from sakd.config import load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  mixed_precision: no\n")
    cfg, _ = load_config(str(recipe), ["model.teacher_quantization=off"])
    assert cfg.training.mixed_precision == "no" and cfg.model.teacher_quantization == "none"
    cfg, _ = load_config({}, ["training.mixed_precision=no", "training.ema=no"])
    assert cfg.training.mixed_precision == "no" and cfg.training.ema is False
