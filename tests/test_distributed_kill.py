"""SIGKILL of one rank of a 2-rank DeepSpeed run (ZeRO-2, ZeRO-3) on CPU, started by the deepspeed launcher
as launch/multi_gpu.sh starts it: the launcher ends (the survivor does not wait forever), no checkpoint
the killed run left half-written is taken for a complete one, and the same `sakd distill` command run
again resumes from the last complete checkpoint to the weights of an uninterrupted run, bit for bit
(one thread per rank, fp32, gloo: every reduction on the CPU path is deterministic).

tests/workers/kill_worker.py is `sakd` with the kill injected (SAKD_TEST_KILL); the runs resumed and the
uninterrupted ones are plain `sakd`. Each test runs 2-3 launches of about 25 s each on 2 cores: slow tier.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).parents[1]
KILL_WORKER = ROOT / "tests" / "workers" / "kill_worker.py"
STEPS = 4
# what ends the survivor: gloo sees the dead rank's sockets close and raises in the collective it waits in,
# and the deepspeed launcher, seeing a rank exit non-zero, terminates the others (SIGKILL after 30 s)
LAUNCHER_GRACE_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tiny_run_config: dict, out: Path, zero: str) -> Path:
    raw = copy.deepcopy(tiny_run_config)
    raw["optimization"]["learning_rate"] = 3e-3
    raw["training"].update(
        output_dir=str(out / "run"),
        max_steps=STEPS,
        batch_size=2,
        gradient_accumulation_steps=2,  # a kill between the two micro-batches is mid-step
        save_every=2,
        keep_last_n=3,
        deepspeed=str(ROOT / "ds_configs" / f"{zero}.json"),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(raw))
    return out / "recipe.json"


def _distill(recipe: Path, kill: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`sakd distill --config RECIPE` on 2 ranks under the deepspeed launcher (--resume auto, the default);
    with ``kill``, rank 1 is SIGKILLed where SAKD_TEST_KILL says. Returns the process and when it ended."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--no_local_rank"]
    cmd += ["--master_port", str(_free_port())]
    cmd += [str(KILL_WORKER)] if kill else ["--module", "sakd.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    if kill:
        env["SAKD_TEST_KILL"] = kill
    proc = subprocess.run(
        [*cmd, "distill", "--config", str(recipe)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # a survivor left waiting in a collective would hit this
        cwd=ROOT,
    )
    return proc, time.time()


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), steps  # each step logged once, across the kill and the resume
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tiny_run_config_module, tmp_path_factory):
    """The same recipe run through without a fault, per ZeRO stage: final weights and logged losses."""
    runs: dict[str, dict] = {}

    def get(zero: str) -> dict:
        if zero not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted_{zero}")
            proc, _ = _distill(_recipe(tiny_run_config_module, out, zero))
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[zero] = {
                "final": load_file(str(out / "run" / "final" / "model.safetensors")),
                "losses": _losses(out / "run"),
            }
        return runs[zero]

    return get


def _killed(recipe: Path, kill: str) -> subprocess.CompletedProcess:
    """The run with rank 1 killed: the launcher fails within a bounded time, and the survivor says in one
    line that another process is gone and which checkpoint the same command will resume from."""
    proc, ended = _distill(recipe, kill)
    died = re.search(r"kill_worker: rank 1 SIGKILLs itself at ([0-9.]+)", proc.stderr)
    assert died, proc.stderr[-3000:]
    # the launcher exits with the first failed rank's code it polls: the SIGKILL's (-9 -> 247) or the survivor's 1
    assert proc.returncode in (256 - 9, 1), proc.stderr[-3000:]
    assert ended - float(died.group(1)) < LAUNCHER_GRACE_S
    survivor = [x for x in proc.stderr.splitlines() if x.startswith("sakd:")]
    newest = Path(json.loads(recipe.read_text())["training"]["output_dir"]) / "checkpoints" / "step-00000002"
    assert survivor == [
        f"sakd: error: another process of this run died or stopped answering ({_why(survivor)}); the newest "
        f"complete checkpoint is {newest} -- run the same command again to resume"
    ]
    assert "by peer" in _why(survivor)  # gloo: the dead rank's sockets closed
    return proc


def _why(lines: list[str]) -> str:
    found = re.search(r"answering \((.*)\); the newest", lines[0]) if lines else None
    return found.group(1) if found else "?"


def _resumed_equals_uninterrupted(recipe: Path, run: Path, reference: dict) -> None:
    """`sakd distill` again: resumes from step 2 and ends with the uninterrupted run's weights and losses."""
    proc, _ = _distill(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000002'} at step 2" in proc.stdout
    final = load_file(str(run / "final" / "model.safetensors"))
    assert final.keys() == reference["final"].keys()
    for k, v in final.items():
        assert torch.equal(v, reference["final"][k]), (k, (v - reference["final"][k]).abs().max())
    assert _losses(run) == reference["losses"]  # exact floats, steps 1-2 from the killed run


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_sigkill_one_rank_mid_step_then_resume_gives_the_uninterrupted_weights(
    tiny_run_config_module, uninterrupted, tmp_path, zero
):
    """Rank 1 dies in step 3, between its two micro-batches (rank 0 is in the step's collectives; under
    ZeRO-3 in a parameter all-gather). Nothing of step 3 is saved; step 2's checkpoint is the newest."""
    recipe = _recipe(tiny_run_config_module, tmp_path, zero)
    run = tmp_path / "run"
    _killed(recipe, "1:3:micro")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (run / "summary.json").exists() and not (run / "final").exists()
    assert sorted(_losses(run)) == [1, 2]
    _resumed_equals_uninterrupted(recipe, run, uninterrupted(zero))


def test_a_checkpoint_half_written_by_a_killed_rank_is_ignored(
    tiny_run_config_module, uninterrupted, tmp_path, capsys
):
    """Rank 1 dies in the final checkpoint write (ZeRO-3), once every rank's shards are written: step 4's
    directory holds all but the trainer state. `sakd export` and `--resume auto` take step 2."""
    from sakd.commands.main import main
    from sakd.models.student import student_state
    from sakd.training.export import deepspeed_state

    recipe = _recipe(tiny_run_config_module, tmp_path, "zero3")
    run = tmp_path / "run"
    _killed(recipe, "1:4:save")
    half = run / "checkpoints" / "step-00000004.tmp"
    shards = sorted(p.name for p in (half / "pytorch_model").iterdir())
    assert shards == [
        f"zero_pp_rank_{r}_mp_rank_00_{w}_states.pt" for r in (0, 1) for w in ("model", "optim")
    ]
    assert (half / "scheduler.bin").is_file() and not (half / "trainer_state.json").exists()
    assert sorted(_losses(run)) == [1, 2, 3, 4]  # the killed run trained all 4 steps

    assert main(["export", str(run), "--output", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    step2 = student_state(deepspeed_state(run / "checkpoints" / "step-00000002"))
    step4 = student_state(deepspeed_state(half))  # what taking the half-written one would have exported
    assert "model.embed_tokens.weight" in exported.keys() & step2.keys()
    assert all(torch.equal(v, step2[k]) for k, v in exported.items() if k in step2)
    assert any(not torch.equal(v, step4[k]) for k, v in exported.items() if k in step4)
    capsys.readouterr()
    assert main(["export", str(run), "--output", str(tmp_path / "x"), "--step", "4"]) != 0
    assert (
        capsys.readouterr().err.strip().endswith("no complete checkpoint for step 4 in " + str(half.parent))
    )

    _resumed_equals_uninterrupted(recipe, run, uninterrupted("zero3"))
    assert not half.exists()  # the resumed run wrote step 4 again, under the same temporary name first
