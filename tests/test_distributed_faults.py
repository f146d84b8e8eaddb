"""Faults on one rank of a 2-process CPU run (tests/workers/dist_worker.py injects them): every rank must
take the same decision at the same step -- no rank waits forever at a barrier, no rank updates alone."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "workers" / "dist_worker.py"


def _run(raw: dict, out: Path, **env: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(raw))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, str(WORKER), str(out / "recipe.json"), str(out), "none"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env},
        timeout=300,  # a rank left waiting at a barrier would hit this
        cwd=ROOT,
    )


def _recipe(tiny_run_config: dict, out: Path, **training) -> dict:
    raw = copy.deepcopy(tiny_run_config)
    raw["optimization"]["learning_rate"] = 3e-3
    raw["training"].update(output_dir=str(out / "run"), max_steps=4, batch_size=2, **training)
    return raw


@pytest.mark.parametrize(
    "deepspeed",
    [
        pytest.param(None, marks=pytest.mark.slow),
        pytest.param("zero0", marks=pytest.mark.slow),
        "zero2",
        "zero3",
    ],
)  # DDP (9 s) and zero0 (18 s) in the slow tier: the same decision path as ZeRO-2's, without the engine
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(
    tiny_run_config_module, tmp_path, deepspeed
):
    """Rank 1's first micro-batch of step 2 (of 2 accumulated) has a NaN loss: detected before its
    backward, agreed by both ranks, the step's update skipped -- under DeepSpeed too, whose engine would
    otherwise step inside ``backward`` -- and the run goes on with finite weights."""
    training = {"gradient_accumulation_steps": 2, "save_every": 1, "keep_last_n": 5}
    if deepspeed:
        training["deepspeed"] = str(ROOT / "ds_configs" / f"{deepspeed}.json")
    raw = _recipe(tiny_run_config_module, tmp_path, **training)
    proc = _run(raw, tmp_path, SAKD_TEST_POISON="1:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in records if "sample_ids" in r]
    assert [(r["step"], r["skipped_steps"]) for r in skips] == [(2, 1)]
    assert len(skips[0]["sample_ids"]) == 2 * 2 * 2  # every block of the step, from both ranks
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [1, 3, 4] and all(math.isfinite(r["loss"]) for r in trained)
    from sakd.training.export import export_run

    weights = {
        s: load_file(str(export_run(run, tmp_path / f"s{s}", step=s) / "model.safetensors"))
        for s in (1, 2, 3)
    }
    for k, v in weights[1].items():
        assert torch.isfinite(weights[3][k]).all(), k
        torch.testing.assert_close(
            weights[2][k], v, rtol=0, atol=0, msg=k
        )  # the skipped step changed nothing
    assert any(not torch.equal(weights[3][k], v) for k, v in weights[1].items())  # the next one trained


def test_a_checkpoint_that_fails_on_one_rank_stops_every_rank(tiny_run_config_module, tmp_path):
    """Rank 1 cannot write its part of the step-2 checkpoint: both ranks stop with the same one-line
    error (none waits at a barrier for the other), and no partial checkpoint is left."""
    raw = _recipe(tiny_run_config_module, tmp_path, save_every=2)
    proc = _run(raw, tmp_path, SAKD_TEST_FAIL_SAVE="1")
    assert proc.returncode != 0
    errors = [(tmp_path / f"rank{r}.error").read_text() for r in (0, 1)]
    for error in errors:
        assert error.startswith("CheckpointError: could not write checkpoint step-00000002"), error
    assert "No space left on device" in errors[1] and "another process" in errors[0]
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))


_PEER = """
import json, os, signal, torch, torch.distributed as dist
from sakd.training.distributed import peer_lost
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGKILL)
try:
    dist.all_reduce(t)
except RuntimeError as e:
    print(json.dumps([peer_lost(e), peer_lost(RuntimeError("shape mismatch"))]), flush=True)
os._exit(0)  # a broken gloo group aborts the interpreter's exit
"""


def test_a_collective_whose_peer_was_killed_is_told_apart_from_a_bug():
    """Two gloo processes (no launcher: it would end the survivor first); rank 1 SIGKILLs itself and rank
    0's next all-reduce fails: :func:`peer_lost` recognises that failure, in one short line, and not others."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PEER],
            env={**env, "RANK": str(r), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for r in (1, 0)
    ]
    (_, _), (out, err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == -9 and procs[1].returncode == 0, err[-2000:]
    why, other = json.loads(out)
    assert other is None and why is not None
    assert "by peer" in why and "\n" not in why and not why.startswith("[") and "GLHF" not in why, why


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
