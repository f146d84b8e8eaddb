"""``sakd bench quality`` across tokenizers and setups: a teacher with its own tokenizer is scored on the
student's stretch of held-out text, and the benchmark scripts that continue or merge an output directory
keep one setup's runs apart from another's."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from sakd.commands import quality_runs as qr

ROOT = Path(__file__).parents[1]


def test_a_second_tokenizer_is_scored_on_the_same_text_as_the_student(corpus, tokenizer_dir, tmp_path):
    """--max-eval-tokens 300 with a student tokenizer of 384 tokens and a teacher tokenizer of 280 (fewer
    bytes per token): the student's stream is its first 300 tokens, as before; the teacher's covers the
    same bytes exactly (the corpus is ASCII, so no character is split at the cut), not its own first 300
    tokens' shorter stretch."""
    from sakd.commands.demo_data import train_tokenizer

    (tmp_path / "few.txt").write_text("\n".join(corpus.read_text().splitlines()[:300]) + "\n")
    other = str(train_tokenizer(tmp_path / "few.txt", tmp_path / "other", 280))
    split = qr.split_data(str(corpus), "line", "text", tmp_path / "data")
    setup = qr.Setup(
        "tiny-moe", "tiny-dense", str(tokenizer_dir), other, split["files"], 32, 4, 1e-3, 2, tmp_path, 16,
        300, str(corpus),
    )  # fmt: skip
    scorer = qr.Scorer(setup)
    for name in ("validation", "test"):
        student, teacher = scorer.stream(str(tokenizer_dir), name), scorer.stream(other, name)
        assert int(teacher.nbytes.sum()) == int(student.nbytes.sum())  # ASCII text: the very same bytes
        assert len(student) == 300 and len(teacher) != 300


def _row(name: str, key: str, arm: str = "ce", seed: int = 0, test: float = 3.0) -> dict:
    return {"budget": 90112, "epochs": 4.5, "arm": arm, "alpha": 0.0, "temperature": 1.0, "seed": seed} | {
        "name": name, "setup_key": key, "validation_bpb": test, "test_bpb": test, "train_seconds": 1.0,
        "seconds_per_step": 0.1, "wall_seconds": 2.0,
    }  # fmt: skip


def test_continue_refuses_an_output_directory_with_another_setups_runs(corpus, tmp_path):
    """benchmarks/quality_continue.py into an OUT whose runs.jsonl holds this very run name from another
    setup: it stops with one line instead of skipping the run as done."""
    out = tmp_path / "q"
    qr.split_data(str(corpus), "line", "text", out / "data")
    (out / "runs.jsonl").write_text(json.dumps(_row("ce_b90112_e4.5_a0_T1_s0", "another")) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality_continue.py"), str(out), str(tmp_path / "t")]
    done = subprocess.run(
        [*cmd, "tiny-dense", str(corpus), "ce:0"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"quality_continue: {out / 'runs.jsonl'} holds runs of another setup (another;")
    assert "[continue]" not in done.stdout


def test_merge_reports_each_setup_once_per_run_and_every_cache(tmp_path, monkeypatch, capsys):
    """benchmarks/quality_merge.py: two setups -> two tables, a run name repeated within a setup counted
    once (said so), the T=1 and T=2 caches of one arm both in the cache-writing seconds; the gap closed
    only for quality.json's own setup (its teacher score is not the other setup's)."""
    out = tmp_path / "q"
    out.mkdir()
    rows = [_row("ce_s0", "a"), _row("ce_s0", "a", test=9.0), _row("ce_s1", "a", seed=1, test=3.2)]
    rows += [_row("ce_s0", "b", test=4.0)]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    caches = [
        {
            "arm": "cache_topk_tail_k4",
            "temperature": t,
            "seconds": s,
            "dir": str(out / "caches" / f"c_T{t}_b8"),
        }
        for t, s in ((1, 1.5), (2, 2.5))
    ]
    teacher = {"validation": {"bpb": 2.1}, "test": {"bpb": 2.0}}
    quality = {"teacher": teacher, "caches": caches, "setup_key": "a"}
    (out / "quality.json").write_text(json.dumps(quality))
    monkeypatch.setattr(sys, "argv", ["quality_merge.py", str(out)])
    runpy.run_path(str(ROOT / "benchmarks" / "quality_merge.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert f"{out / 'runs.jsonl'} holds 2 setups (setup_key): one table each" in text
    assert "duplicate run ce_s0 (setup a): keeping its first row" in text
    assert "## setup a: 2 runs" in text and "## setup b: 1 runs" in text
    assert "ce seeds [0, 1] test [3.0, 3.2]" in text
    other = text.split("## setup b: 1 runs")[1]
    assert "(not the setup of quality.json" in other and "ce [(0, 4.0)]" in other and "gap" not in other
    assert "cache writing s: {'c_T1_b8': 1.5, 'c_T2_b8': 2.5}" in text


@pytest.mark.parametrize("other", [True, False])
def test_rows_to_continue_keeps_only_this_setup_and_student(tmp_path, other):
    from sakd.commands.quality_setup import rows_to_continue
    from sakd.errors import ConfigError

    rows = [_row("ce_s0", "k") | {"student": "tiny-dense"}, _row("ce_s1", "k") | {"student": "other"}]
    rows += [_row("ce_s2", "x")] if other else []
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if other:
        with pytest.raises(ConfigError, match="holds runs of another setup"):
            rows_to_continue(tmp_path / "runs.jsonl", "k", "tiny-dense")
    else:
        assert list(rows_to_continue(tmp_path / "runs.jsonl", "k", "tiny-dense")) == ["ce_s0"]
