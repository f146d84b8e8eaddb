"""A teacher cache that does not fit is refused in one line that names the problem: damaged shards
(``--verify`` and training), and a recipe whose data, teacher tokenizer or teacher differs from the
manifest."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from sakd.cli import main
from sakd.data.synthetic import write_corpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tiny_run_config_module, tmp_path_factory):
    """A small topk cache of a recipe whose corpus is a copy the tests may change."""
    tmp = tmp_path_factory.mktemp("refusals")
    raw = copy.deepcopy(tiny_run_config_module)
    corpus = tmp / "corpus.txt"
    shutil.copy(raw["data"]["train"], corpus)
    raw["data"].update(train=str(corpus), max_train_blocks=32)
    raw["distillation"]["cache"] = {"blocks_per_shard": 8, "batch_size": 8, "mode": "topk", "top_k": 8}
    raw["training"].update(output_dir=str(tmp / "run"), max_steps=2)
    recipe = tmp / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["cache-teacher", "--config", str(recipe), "--output", str(tmp / "cache")]) == 0
    return tmp, recipe, raw


def _last_err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def _distill(recipe: Path, cache: Path, tmp: Path, *overrides: str) -> int:
    out = tmp / "runs" / cache.name
    return main(
        [
            "distill",
            "--config",
            str(recipe),
            f"distillation.teacher_cache={cache}",
            f"training.output_dir={out}",
            *overrides,
            "--overwrite",
        ]
    )


def test_verify_passes_an_intact_cache(setup, capsys):
    tmp, _, _ = setup
    assert main(["cache-teacher", "--verify", str(tmp / "cache")]) == 0
    assert "ok -- 4 shards" in capsys.readouterr().out


def test_truncated_and_altered_shards_are_named_and_refused(setup, capsys):
    tmp, recipe, _ = setup
    bad = tmp / "bad"
    shutil.copytree(tmp / "cache", bad)
    one = bad / "shards" / "shard-00001.safetensors"
    one.write_bytes(one.read_bytes()[:-100])
    two = bad / "shards" / "shard-00002.safetensors"
    data = bytearray(two.read_bytes())
    data[len(data) // 2] ^= 0xFF
    two.write_bytes(bytes(data))
    assert main(["cache-teacher", "--verify", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "shard-00001.safetensors: truncated" in err and "shard-00002.safetensors: altered" in err
    assert "2 of 4 shards fail verification" in err
    # training refuses before it trains: the truncated shard first, then (once it is repaired) the altered one
    assert _distill(recipe, bad, tmp) == 2
    line = _last_err(capsys)
    assert "fails verification" in line and "shard-00001.safetensors: truncated" in line
    shutil.copy(tmp / "cache" / "shards" / "shard-00001.safetensors", one)
    assert _distill(recipe, bad, tmp) == 2
    assert "shard-00002.safetensors: altered" in _last_err(capsys)
    assert not (tmp / "runs" / "bad" / "checkpoints").exists() or not any(
        (tmp / "runs" / "bad" / "checkpoints").iterdir()
    )


def test_an_unfinished_or_missing_cache_is_refused(setup, capsys, tmp_path):
    tmp, recipe, _ = setup
    partial = tmp_path / "partial"
    shutil.copytree(tmp / "cache", partial)
    (partial / "manifest.json").rename(partial / "plan.json")
    assert _distill(recipe, partial, tmp) == 2
    assert "not a complete teacher cache" in _last_err(capsys)
    assert _distill(recipe, tmp_path / "nothing", tmp) == 2
    assert "teacher cache not found" in _last_err(capsys)


@pytest.mark.parametrize(
    "change, expected",
    [
        ("teacher", "model.teacher differs (cache: tiny-moe, recipe: tiny-dense)"),
        ("seed", "the preset teacher was initialised with seed 1 (training.seed=0)"),
        ("data_path", "data.train differs"),
        ("data_text", "the training documents differ"),
        ("eval_fraction", "data.eval_fraction differs (cache: 0.05, recipe: 0.1)"),
        ("temperature", "differs from the cache's 2.0"),
        ("aux", "distillation.feature needs the teacher's hidden states"),
        (
            "mode",
            "distillation.loss.sparse=sampled cannot use a teacher cache, which serves subset or topk_tail",
        ),
    ],
)
def test_a_recipe_that_does_not_match_the_manifest_is_refused(setup, capsys, tmp_path, change, expected):
    tmp, recipe, raw = setup
    overrides: list[str] = []
    if change == "teacher":
        overrides = ["model.teacher=tiny-dense"]
    elif change == "seed":
        overrides = ["training.seed=1"]
    elif change == "data_path":
        other = write_corpus(tmp_path / "other.txt", num_docs=60, seed=11)
        overrides = [f"data.train={other}"]
    elif change == "data_text":
        changed = copy.deepcopy(raw)
        corpus = tmp_path / "corpus.txt"
        shutil.copy(raw["data"]["train"], corpus)
        changed["data"]["train"] = str(corpus)
        # same documents but one: same settings apart from the path, so it names the text itself
        lines = corpus.read_text().splitlines()
        corpus.write_text("\n".join([lines[0] + " changed", *lines[1:]]) + "\n")
        cache = tmp_path / "cache"
        shutil.copytree(tmp / "cache", cache)
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["data"]["train"] = str(corpus)
        (cache / "manifest.json").write_text(json.dumps(manifest))
        assert _distill(recipe, cache, tmp, f"data.train={corpus}") == 2
        assert expected in _last_err(capsys)
        return
    elif change == "eval_fraction":
        overrides = ["data.eval_fraction=0.1"]
    elif change == "temperature":
        overrides = ["distillation.loss.temperature=1.0"]
    elif change == "aux":
        overrides = ["distillation.feature.weight=1.0"]
    elif change == "mode":
        overrides = ["distillation.loss.sparse=sampled"]
    assert _distill(recipe, tmp / "cache", tmp, *overrides) == 2
    line = _last_err(capsys)
    assert expected in line, line
    assert line.startswith("sakd: error: ")


def test_another_teacher_tokenizer_is_refused(setup, capsys, permuted_tokenizer_dir):
    """Same vocabulary size (so the preset teacher's config is the same), other ids: the tokenizer is named."""
    tmp, recipe, _ = setup
    other = permuted_tokenizer_dir
    assert _distill(recipe, tmp / "cache", tmp, f"model.teacher_tokenizer={other}") == 2
    assert "the teacher tokenizer differs from the cache's" in _last_err(capsys)


def test_cache_teacher_argument_errors(capsys, tmp_path):
    assert main(["cache-teacher", "--output", str(tmp_path)]) == 2
    assert "needs --config RECIPE and --output DIR" in _last_err(capsys)
    assert main(["cache-teacher", "--verify", str(tmp_path), "--output", str(tmp_path)]) == 2
    assert main(["cache-teacher", "--verify", str(tmp_path / "none")]) == 2
    assert "teacher cache not found" in _last_err(capsys)


def test_a_sampled_cache_for_a_loss_other_than_forward_kl_is_refused_in_one_line(setup, capsys, tmp_path):
    """The default cache mode (sampled) trains forward KL only: a recipe with another kind is refused when
    the cache is written, naming the mode that serves it, not after the teacher ran over the whole corpus."""
    _, _, raw = setup
    raw = copy.deepcopy(raw)
    raw["distillation"]["cache"] = {"blocks_per_shard": 8, "batch_size": 8}
    raw["distillation"]["loss"]["kind"] = "rkl"
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["cache-teacher", "--config", str(recipe), "--output", str(tmp_path / "cache")]) == 2
    assert "distillation.cache.mode=topk_tail" in _last_err(capsys)
    assert not (tmp_path / "cache" / "manifest.json").exists()
