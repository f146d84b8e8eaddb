"""The demo end to end with a tiny budget: the summary contract, files, teacher cache reuse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sakd.commands.demo import run_demo

pytestmark = pytest.mark.integration

TINY = {
    "heldout_docs": 30,
    "validation_docs": 30,
    "student_docs": 40,
    "teacher_batch_size": 4,
    "student_epochs": 1,
    "seeds": 2,
    "corpus_docs": 300,
    "vocab_size": 320,
    "teacher_vocab_size": 400,
    "block_size": 32,
    "teacher_steps": 6,
    "batch_size": 4,
}
CONTRACT = {
    "teacher_ppl",
    "kd_student_ppl",
    "ce_student_ppl",
    "kd_student_agreement",
    "train_seconds",
    "student_dir",
    "teacher_bpb",
    "kd_student_bpb",
    "ce_student_bpb",
    "kd_gap_closed",
}


def test_demo_tiny_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAKD_CACHE_DIR", str(tmp_path / "cache"))
    summary = run_demo(tmp_path / "demo", budget=TINY)
    assert CONTRACT <= summary.keys()
    on_disk = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert on_disk == summary
    assert all(1 < summary[k] < 1e6 for k in ("teacher_ppl", "kd_student_ppl", "ce_student_ppl"))
    assert 0 <= summary["kd_student_agreement"] <= 1
    # bits per byte: all three models scored on the same held-out text (strided), each in its own tokens
    assert summary["sample_by"] == "line" and summary["eval_method"] == "strided"
    assert summary["teacher_eval_tokens"] != summary["eval_tokens"]  # different tokenizers
    assert abs(summary["teacher_eval_bytes"] - summary["eval_bytes"]) <= 8  # the same text (but token 0)
    for who in ("teacher", "kd_student", "ce_student"):
        assert 0 < summary[f"{who}_bpb"] < 10
    # per student seed, a KD student and its CE twin; the gap closed is against the CE seed lowest on
    # validation (its held-out bits per byte), and per seed against its own twin
    seeds = summary["per_seed"]
    assert [s["seed"] for s in seeds] == list(range(TINY["seeds"]))
    t = summary["teacher_bpb"]
    ref = min(seeds, key=lambda s: s["ce_student_validation_bpb"])
    assert summary["ce_reference_seed"] == ref["seed"]
    assert all(s["ce_student_validation_bpb"] != s["ce_student_bpb"] for s in seeds)  # other documents
    best_ce = ref["ce_student_bpb"]
    closed = [(best_ce - s["kd_student_bpb"]) / (best_ce - t) for s in seeds]
    paired = [(s["ce_student_bpb"] - s["kd_student_bpb"]) / (s["ce_student_bpb"] - t) for s in seeds]
    assert summary["kd_gap_closed_paired"] == pytest.approx(paired)
    assert summary["kd_gap_closed"] == pytest.approx(sum(closed) / len(closed))
    assert (summary["kd_gap_closed_min"], summary["kd_gap_closed_max"]) == pytest.approx(
        (min(closed), max(closed))
    )
    assert summary["kd_student_bpb"] == pytest.approx(sum(s["kd_student_bpb"] for s in seeds) / len(seeds))
    assert summary["ce_student_bpb"] == pytest.approx(sum(s["ce_student_bpb"] for s in seeds) / len(seeds))
    # the student learns from a subset of the teacher's documents; validation and held-out are neither
    docs = {
        name: (tmp_path / "demo" / "data" / f"{name}.jsonl").read_text().splitlines()
        for name in summary["documents"]
    }
    assert docs["student"] == docs["teacher"][: TINY["student_docs"]]
    assert sum(map(len, (docs["teacher"], docs["validation"], docs["heldout"]))) == TINY["corpus_docs"]
    assert len(docs["heldout"]) == TINY["heldout_docs"] and len(docs["validation"]) == TINY["validation_docs"]
    assert summary["scored_on"] == "heldout" and summary["eval_documents"] == TINY["heldout_docs"]
    # teacher and student tokenize differently: the default path goes through the alignment
    assert summary["student_vocab"] != summary["teacher_vocab"]
    assert 0 < summary["alignment"]["anchored"] <= 1 and 0 < summary["alignment"]["student_coverage"] <= 1
    # the verdict is on mean bits per byte (a mean of perplexities, exp(loss), can order the other way)
    mean_kd, mean_ce = (sum(s[f"{w}_student_bpb"] for s in seeds) / len(seeds) for w in ("kd", "ce"))
    assert summary["kd_beats_ce"] == (mean_kd < mean_ce)
    assert (tmp_path / "demo" / "loss_curves.png").stat().st_size > 1000
    AutoModelForCausalLM.from_pretrained(summary["student_dir"])  # the exported student loads

    capsys.readouterr()
    again = run_demo(tmp_path / "demo", budget=TINY)
    assert "reusing cached teacher" in capsys.readouterr().out
    assert again["teacher_ppl"] == pytest.approx(summary["teacher_ppl"])
    assert again["per_seed"] == summary["per_seed"]  # deterministic


DRIVER = """
import json, sys
from sakd.commands import demo, main
demo.DEMO.update(json.loads(sys.argv[1]))
sys.exit(main.main(["demo", "--output-dir", sys.argv[2]]))
"""


@pytest.mark.slow  # 27 s; a stopped run resumes exactly is tested in the default tier (test_reliability.py)
def test_demo_stopped_during_teacher_pretraining_resumes(tmp_path):
    """SIGTERM while the teacher pretrains: the one-line stop message of `sakd distill`, exit 143, and the
    next demo resumes the teacher from its checkpoint and finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    budget = {**TINY, "teacher_steps": 300}
    env = {**os.environ, "SAKD_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-c", DRIVER, json.dumps(budget), str(tmp_path / "demo")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    metrics = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "cache" / "demo-teacher").glob("*.run/metrics.jsonl"))
        if found and found[0].read_text().count("\n") >= 2:  # a few steps into pretraining
            metrics = found[0]
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert metrics is not None, f"the teacher never started: {err}"
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sakd: stopped by SIGTERM at step ") and last.endswith(
        "(run the same command again to resume)"
    )
    assert "internal error" not in err and "Traceback" not in err
    stopped_at = int(last.split("at step ")[1].split(";")[0])
    assert 0 < stopped_at < budget["teacher_steps"]

    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming the stopped tiny-moe teacher" in again.stdout
    resumed = [ln for ln in again.stdout.splitlines() if ln.startswith("resumed from ")]
    assert resumed and resumed[0].endswith(f"at step {stopped_at}")  # not a silent restart
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert CONTRACT <= summary.keys()
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] if metrics.exists() else []
    assert not steps  # the finished teacher's run directory is gone: it became the cached teacher
    assert (Path(summary["teacher_dir"]) / "model.safetensors").is_file()
