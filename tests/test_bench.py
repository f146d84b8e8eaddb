"""The benchmark commands work and report what they say (their numbers are in BENCHMARKS.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def test_gpu_check_runs_in_reduced_mode(tmp_path):
    """launch/gpu_check.sh --reduced, as CI runs it: one JSON with every variant, the CUDA ones skipped on
    a CPU, the others measured."""
    from sakd.commands.bench_gpu import REDUCED_VARIANTS, VARIANTS
    from sakd.planner.sizes import model_numbers

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", "launch/gpu_check.sh", str(out), "--reduced", "--work-dir", str(tmp_path / "work")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "reduced" and report["setup"]["recipe"].endswith(
        "huihui-moe-1b-to-smollm-135m.yaml"
    )
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == [*REDUCED_VARIANTS, *VARIANTS]
    measured = [r for r in rows.values() if "skipped" not in r]
    if not torch.cuda.is_available():
        assert {r["variant"] for r in measured} == set(REDUCED_VARIANTS)
        assert all(r["skipped"] == "needs CUDA" for r in rows.values() if "skipped" in r)
    from transformers import AutoTokenizer

    vs = len(AutoTokenizer.from_pretrained(report["setup"]["student_tokenizer"]))
    vt = len(AutoTokenizer.from_pretrained(report["setup"]["teacher_tokenizer"]))
    flops = 2 * model_numbers("tiny-moe", vt).active_params + 6 * model_numbers("tiny-dense", vs).total_params
    for r in measured:
        assert r["fits"] and r["tokens_per_s"] > 0 and r["planned_gib"] > 0
        assert r["tokens_per_step"] == 2 * 2 * 32  # batch 2 x 32 tokens, 2 accumulated
        assert r["flops_per_token"] == flops


def test_bench_step_measures_one_case(tmp_path):
    from sakd.commands.bench_step import _measure_case, reduced_setup

    row = _measure_case(reduced_setup(tmp_path), "cross+aux")
    assert row["student_tokens"] == 2 * 32 and row["teacher_tokens"] > 0
    parts = ("teacher_forward", "student_fwd_bwd", "optimizer_step", "kd_step")
    assert all(row[f"{p}_seconds"] > 0 and row[f"{p}_tokens_per_s"] > 0 for p in parts)
    a, b, c = (row[f"{p}_seconds"] for p in ("teacher_forward", "student_fwd_bwd", "kd_step"))
    assert row["overhead_c_over_a_plus_b"] == pytest.approx(c / (a + b))
    assert row["student_vocab"] != row["teacher_vocab"]  # across tokenizers


@pytest.mark.slow
def test_bench_step_cli_reduced(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sakd.cli", "bench", "step", "--reduced", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "c/(a+b)" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["same", "cross", "same+aux", "cross+aux"]


def test_bench_optim_times_each_adamw_implementation():
    """Each implementation is timed on the preset's parameter groups, and the ratios are against fused."""
    from sakd.commands.bench_optim import run, to_markdown

    rows = run("tiny-dense", ("loop", "fused"), steps=2, warmup=1)
    assert [r["impl"] for r in rows] == ["loop", "fused"]
    assert all(r["seconds"] > 0 and r["seconds_min"] <= r["seconds"] for r in rows)
    assert rows[0]["params"] == rows[1]["params"] > 0
    assert rows[1]["vs_fused"] == 1.0 and rows[0]["vs_fused"] == pytest.approx(
        rows[0]["seconds"] / rows[1]["seconds"]
    )
    assert "| loop |" in to_markdown(rows)
