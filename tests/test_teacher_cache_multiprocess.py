"""``sakd cache-teacher`` and training from its cache with 2 CPU processes (torchrun): each rank writes its
own shards and the cache is byte for byte the single-process one (teacher replicated, or partitioned by
ZeRO-3); training on 2 ranks from the cache gives the single-process run's losses and weights."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).parents[1]


def _run(args: list[str], nproc: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sakd.cli", *args]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "-m",
            "sakd.cli",
            *args,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_processes_write_the_single_process_cache_and_train_alike(tiny_run_config, tmp_path):
    raw = copy.deepcopy(tiny_run_config)
    raw["data"]["max_train_blocks"] = 40
    raw["distillation"]["cache"] = {
        "blocks_per_shard": 8,
        "batch_size": 3,
        "mode": "sampled",
        "num_samples": 8,
    }
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    # one process, and two with the teacher partitioned by ZeRO-3 (every forward a collective: rank 1 has 2
    # shards to rank 0's 3, so it runs throw-away forwards to keep in step)
    runs = {"1": ([], 1), "2": (["training.deepspeed=ds_configs/zero3.json"], 2)}
    per_rank = {}
    for name, (extra, n) in runs.items():
        out = _run(
            ["cache-teacher", "--config", str(recipe), "--output", str(tmp_path / f"cache{name}"), *extra], n
        )
        per_rank[name] = json.loads(out[out.index("{") :])["computed_per_rank"]
    assert per_rank == {"1": [40 * 32], "2": [24 * 32, 16 * 32]}  # each rank wrote its own shards
    one, two = (json.loads((tmp_path / f"cache{name}" / "manifest.json").read_text()) for name in runs)
    assert len(one["shards"]) == 5 and two["shards"] == one["shards"]  # every shard's size and SHA-256
    for rec in one["shards"]:
        assert (tmp_path / "cache1" / rec["file"]).read_bytes() == (
            tmp_path / "cache2" / rec["file"]
        ).read_bytes()

    raw["distillation"]["teacher_cache"] = str(tmp_path / "cache2")
    raw["training"].update(max_steps=3, batch_size=4)
    runs = {}
    for n, accumulation in ((1, 2), (2, 1)):  # 8 blocks per optimizer step either way
        r = copy.deepcopy(raw)
        r["training"].update(gradient_accumulation_steps=accumulation, output_dir=str(tmp_path / f"run{n}"))
        path = tmp_path / f"train{n}.json"
        path.write_text(json.dumps(r))
        _run(["distill", "--config", str(path)], n)
        lines = (tmp_path / f"run{n}" / "metrics.jsonl").read_text().splitlines()
        runs[n] = (
            [json.loads(x) for x in lines if '"loss"' in x],
            load_file(str(tmp_path / f"run{n}" / "final" / "model.safetensors")),
        )
    for a, b in zip(runs[1][0], runs[2][0], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["tokens"] == a["tokens"]
    for k, v in runs[1][1].items():
        assert (runs[2][1][k] - v).abs().max() < 1e-6, k
