"""``sakd cache-teacher`` and training from its cache, on tiny models: what is stored (against a direct
teacher forward), resume, verification, refusals, and training that equals online KD when every id is
stored (same tokenizer), however the step is split and across resume."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sakd.cli import main
from sakd.config import load_config
from sakd.data import pack
from sakd.data.text import load_text_dataset
from sakd.models import load_model, load_tokenizer
from sakd.teacher.cache.blocks import token_blocks
from sakd.teacher.cache.manifest import MANIFEST_FILE, PLAN_FILE, read_manifest, shard_record_file
from sakd.teacher.cache.reader import CacheReader
from sakd.training.trainer import Distiller

pytestmark = pytest.mark.integration

BLOCKS = 64  # training blocks of every run here (and cached blocks)


def _write(raw: dict, path: Path) -> Path:
    path.write_text(json.dumps(raw))
    return path


def _cache_cli(recipe: Path, out: Path, *overrides: str) -> int:
    return main(["cache-teacher", "--config", str(recipe), "--output", str(out), *overrides])


@pytest.fixture(scope="module")
def recipe(tiny_run_config_module, tmp_path_factory) -> dict:
    raw = copy.deepcopy(tiny_run_config_module)
    raw["data"]["max_train_blocks"] = BLOCKS
    raw["distillation"]["cache"] = {"mode": "topk_tail", "blocks_per_shard": 16, "batch_size": 4}
    raw["training"]["output_dir"] = str(tmp_path_factory.mktemp("runs") / "run")
    return raw


@pytest.fixture(scope="module")
def vocab(tokenizer_dir) -> int:
    return len(load_tokenizer(str(tokenizer_dir)))


@pytest.fixture(scope="module")
def full_cache(recipe, vocab, tmp_path_factory) -> Path:
    """Every id of every position (k = V) in float32: training from it must equal online KD."""
    tmp = tmp_path_factory.mktemp("cacheV")
    path = _write(recipe, tmp / "recipe.json")
    overrides = [f"distillation.cache.top_k={vocab}", "distillation.cache.values_dtype=float32"]
    assert _cache_cli(path, tmp / "cache", *overrides) == 0
    return tmp / "cache"


def test_the_cache_holds_the_teachers_distribution(full_cache, recipe, tokenizer_dir, corpus):
    """Against an independent forward of the same preset teacher on the same packed blocks."""
    manifest = read_manifest(full_cache)
    reader = CacheReader(full_cache, manifest)
    tok = load_tokenizer(str(tokenizer_dir))
    teacher = load_model("tiny-moe", tokenizer=tok, seed=recipe["training"]["seed"] + 1).eval()
    docs = load_text_dataset(str(corpus), sample_by="line").train_test_split(
        test_size=0.05, seed=0, shuffle=True
    )["train"]
    packed = pack(docs, tok, 32)
    for b in (0, 17, BLOCKS - 1):
        blk = reader.block(b)
        assert torch.equal(blk.token_ids, torch.tensor(packed[b]["input_ids"]))
        with torch.no_grad():
            logits = teacher(input_ids=blk.token_ids[None]).logits[0].double()
        lp = torch.log_softmax(logits / 2.0, -1)
        assert torch.equal(blk.indices[:, 0], lp.argmax(-1))
        torch.testing.assert_close(blk.logprobs.double(), lp.gather(-1, blk.indices), atol=2e-5, rtol=0)
        torch.testing.assert_close(
            blk.next_logprob[:-1].double(),
            lp[:-1].gather(-1, blk.token_ids[1:, None])[:, 0],
            atol=2e-5,
            rtol=0,
        )
        assert torch.isinf(blk.tail).all()  # k = V: nothing outside the stored ids
    assert manifest["format_version"] == 1 and manifest["signal"]["mode"] == "topk_tail"
    assert manifest["layout"] == {
        "blocks": BLOCKS,
        "positions": BLOCKS * 32,
        "blocks_per_shard": 16,
        "shards": 4,
    }
    assert [s["positions"] for s in manifest["shards"]] == [16 * 32] * 4
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    assert set(manifest["teacher"]) == {"source", "config_sha256", "preset_seed"}
    assert manifest["data"]["documents"] == len(docs) and manifest["signal"]["temperature"] == 2.0


def test_token_blocks_are_the_packed_blocks_across_map_batches(tokenizer_dir, tmp_path):
    """More documents and blocks than one datasets.map batch: the blocks are pack's (one stream, only its
    last < block_size tokens left out), each continues the previous one's text and tokens."""
    import datasets

    tok = load_tokenizer(str(tokenizer_dir))
    texts = [f"doc {i} says hello to {i % 7} friends" for i in range(4500)]
    docs = datasets.Dataset.from_dict({"text": texts})
    ours, theirs = token_blocks(docs, tok, 16), pack(docs, tok, 16)
    assert ours["input_ids"] == theirs["input_ids"]
    stream = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert len(ours) == len(stream) // 16
    assert ours["follows_previous"] == [False] + [True] * (len(ours) - 1)
    assert ours["next_id"] == [
        stream[16 * (k + 1)] if 16 * (k + 1) < len(stream) else -1 for k in range(len(ours))
    ]
    ends = [e for row in ours["char_end"] for e in row]
    assert ends == sorted(ends)
    assert ours["char_base"][1:] == [row[-1] for row in ours["char_end"][:-1]]
    # the last token of the last document's EOS ends one virtual character after the text before it
    eos_at = [k for k, i in enumerate(stream[: 16 * len(ours)]) if i == tok.eos_token_id]
    assert ends[eos_at[0]] == len(texts[0]) + 1 and ends[eos_at[1]] == len(texts[0]) + len(texts[1]) + 2


def test_resume_of_an_interrupted_generation(full_cache, recipe, vocab, tmp_path):
    """The on-disk state of a run stopped after two shards (plan, two recorded shards, a half-written
    temporary file, an unrecorded shard) resumes: only the missing shards are computed, and the result is
    byte for byte the uninterrupted cache."""
    manifest = read_manifest(full_cache)
    cache = tmp_path / "cache"
    shutil.copytree(full_cache, cache)
    (cache / MANIFEST_FILE).unlink()
    header = {k: v for k, v in manifest.items() if k not in ("shards", "totals")}
    (cache / PLAN_FILE).write_text(json.dumps(header))
    for s in (0, 1):
        (cache / shard_record_file(s)).write_text(json.dumps(manifest["shards"][s]))
    (cache / "shards" / "shard-00002.safetensors").rename(cache / "shards" / "shard-00002.safetensors.tmp")
    data = (cache / "shards" / "shard-00003.safetensors").read_bytes()
    (cache / "shards" / "shard-00003.safetensors").write_bytes(data[: len(data) // 2])
    path = _write(recipe, tmp_path / "recipe.json")
    overrides = [f"distillation.cache.top_k={vocab}", "distillation.cache.values_dtype=float32"]
    assert _cache_cli(path, cache, *overrides) == 0
    resumed = read_manifest(cache)
    assert resumed["shards"] == manifest["shards"]
    assert not (cache / PLAN_FILE).exists() and not list((cache / "shards").glob("*.json"))
    # a rerun of a complete cache computes nothing; another recipe is refused unless --overwrite
    assert _cache_cli(path, cache, *overrides) == 0
    assert _cache_cli(path, cache, "distillation.cache.top_k=8") == 2


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _train(make_distiller, raw: dict, out: Path, **training):
    d = make_distiller(raw, output_dir=str(out), **training)
    d.train()
    return d, _metrics(out), load_file(str(out / "final" / "model.safetensors"))


def test_training_from_a_cache_with_every_id_equals_online_kd(full_cache, recipe, make_distiller, tmp_path):
    """Same tokenizer, k = V, float32: the loss of every step and the weights after 4 steps match online KD
    (dense forward KL through the fused loss), and the teacher is never loaded."""
    _, online, w_online = _train(make_distiller, recipe, tmp_path / "online")
    raw = copy.deepcopy(recipe)
    raw["distillation"]["teacher_cache"] = str(full_cache)
    d, cached, w_cached = _train(make_distiller, raw, tmp_path / "cached")
    assert d.teacher is None and d.cfg.distillation.loss.sparse == "topk_tail"
    assert len(online) == len(cached) == 4
    for a, b in zip(online, cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["kd"] == pytest.approx(a["kd"], rel=1e-5)
    for k in w_online:
        torch.testing.assert_close(w_cached[k], w_online[k], rtol=0, atol=2e-6)


def test_training_from_a_cache_is_split_invariant_and_resumes_exactly(
    full_cache, recipe, make_distiller, tmp_path
):
    """The cache is read by block id, so 1 x 8 and 4 x 2 micro-batches give the same weights, and
    2 steps + resume + 2 steps equals 4 steps bit for bit."""
    raw = copy.deepcopy(recipe)
    raw["distillation"]["teacher_cache"] = str(full_cache)
    raw["distillation"]["loss"]["kd_top_k"] = 16  # the best 16 of the stored ids
    _, m1, one = _train(make_distiller, raw, tmp_path / "a", batch_size=8, gradient_accumulation_steps=1)
    _, m4, four = _train(make_distiller, raw, tmp_path / "b", batch_size=2, gradient_accumulation_steps=4)
    for a, b in zip(m1, m4, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    for k in one:
        torch.testing.assert_close(four[k], one[k], rtol=0, atol=1e-6)
    raw["training"].update(save_every=2, keep_last_n=5)
    _, _, full = _train(make_distiller, raw, tmp_path / "full")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    raw["training"]["output_dir"] = str(resumed)
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="auto")
    assert d.state.step == 2
    d.train()
    again = load_file(str(resumed / "final" / "model.safetensors"))
    for k in full:
        assert torch.equal(again[k], full[k]), k


@pytest.mark.slow
def test_a_killed_generation_resumes_to_the_same_cache(recipe, tmp_path):
    """SIGKILL once the first shards are on disk, rerun: the cache equals an uninterrupted one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    raw = copy.deepcopy(recipe)
    raw["distillation"]["cache"] = {"mode": "topk_tail", "blocks_per_shard": 2, "batch_size": 1}
    path = _write(raw, tmp_path / "recipe.json")
    assert _cache_cli(path, tmp_path / "whole") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "sakd.cli",
        "cache-teacher",
        "--config",
        str(path),
        "--output",
        str(tmp_path / "killed"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((tmp_path / "killed" / "shards").glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / MANIFEST_FILE).exists()
    assert _cache_cli(path, tmp_path / "killed") == 0
    assert read_manifest(tmp_path / "killed")["shards"] == read_manifest(tmp_path / "whole")["shards"]
