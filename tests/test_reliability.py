"""Reliability: a run killed (SIGKILL) or stopped (SIGTERM/SIGINT) resumes to the same weights as an
uninterrupted run; damaged checkpoints are skipped, never deleted; pruning keeps what resume needs."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from sakd.cli import main
from sakd.config import load_config
from sakd.errors import RunDirError
from sakd.training import checkpoint
from sakd.training.trainer import Distiller

pytestmark = pytest.mark.integration

# The real `sakd distill` CLI in a child process, each optimizer step slowed down so that the test can
# signal it mid-run (tiny models otherwise finish before the test sees the first checkpoint).
_SLOW_CLI = (
    "import sys, time\n"
    "from sakd.training import trainer\n"
    "step = trainer.Distiller.train_step\n"
    "def slow(self, mb):\n"
    "    time.sleep(0.3)\n"
    "    return step(self, mb)\n"
    "trainer.Distiller.train_step = slow\n"
    "from sakd.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


# every part with state of its own: the SAR router and its optimizer, the token router's running statistics,
# the balancer's magnitudes (the phases and a feature term make the balancer see four components)
STUDENT_AWARE = {
    "moe": {"student_aware_router": True, "router_lr": 1e-2, "router_anchor_coef": 0.1},
    "router": {"enabled": True, "sharpen_end": 0.25},
    "curriculum": {"phases": True, "balance": True, "structure_start": 0.2, "ramp": 0.2},
    "feature": {"weight": 0.5},
}


def _recipe(tiny_run_config: dict, tmp_path: Path, name: str, **distillation: dict) -> tuple[dict, Path]:
    raw = copy.deepcopy(tiny_run_config)
    raw["training"].update(
        output_dir=str(tmp_path / name), max_steps=8, save_every=2, keep_last_n=3, batch_size=2
    )
    raw["distillation"]["loss"].update(temperature_schedule="linear", min_temperature=1.0)
    raw["distillation"].update(copy.deepcopy(distillation))
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(raw))
    return raw, path


def _reference(raw: dict, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The same recipe trained without interruption (in this process)."""
    raw = copy.deepcopy(raw)
    raw["training"]["output_dir"] = str(tmp_path / "reference")
    cfg, _ = load_config(raw)
    Distiller(cfg, resume="none", overwrite=True).train()
    return load_file(str(tmp_path / "reference" / "final" / "model.safetensors"))


def _start(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, "distill", "--config", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while checkpoint.latest(run / "checkpoints") is None:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def _trained_steps(run: Path) -> list[int]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(  # the student-aware parts' exact resume is also test_composition's (default tier)
    "student_aware", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["plain", "student_aware"]
)
def test_sigkill_then_resume_is_bitwise_identical(tiny_run_config, tmp_path, student_aware):
    raw, recipe = _recipe(tiny_run_config, tmp_path, "killed", **(STUDENT_AWARE if student_aware else {}))
    run = Path(raw["training"]["output_dir"])
    proc = _start(recipe)
    _wait_for_checkpoint(proc, run)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists() and not (run / "final").exists()
    killed_at = max(_trained_steps(run))
    assert 2 <= killed_at < 8  # killed mid-run, after the first checkpoint

    resumed = subprocess.run(
        [sys.executable, "-m", "sakd.cli", "distill", "--config", str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (run / "summary.json").exists()
    assert _trained_steps(run) == list(range(1, 9))  # steps after the checkpoint were logged once
    _assert_same_weights(load_file(str(run / "final" / "model.safetensors")), _reference(raw, tmp_path))
    if student_aware:  # the new state, in the last checkpoint of both runs
        ckpt = Path("checkpoints") / "step-00000008"
        for name in ("sar_router.safetensors", "token_router.safetensors"):
            _assert_same_weights(
                load_file(str(run / ckpt / name)), load_file(str(tmp_path / "reference" / ckpt / name))
            )
        state = [
            json.loads((r / ckpt / "student_aware.json").read_text()) for r in (run, tmp_path / "reference")
        ]
        assert state[0] == state[1] and state[0]["balancer"]
        a, b = (
            torch.load(r / ckpt / "sar_optimizer.pt", weights_only=True)
            for r in (run, tmp_path / "reference")
        )
        assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])


def test_sigterm_checkpoints_stops_and_resumes_identically(tiny_run_config, tmp_path):
    raw, recipe = _recipe(tiny_run_config, tmp_path, "stopped")
    run = Path(raw["training"]["output_dir"])
    proc = _start(recipe)
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    last = err.strip().splitlines()[-1]
    assert last.startswith("sakd: stopped by SIGTERM at step ") and "resume" in last
    assert "Traceback" not in err
    assert not (run / "summary.json").exists() and not (run / "final").exists()
    stopped_at = max(_trained_steps(run))
    assert stopped_at < 8
    newest = checkpoint.latest(run / "checkpoints")  # the step in flight finished and was saved
    assert newest is not None and checkpoint.problem(newest) is None
    assert json.loads((newest / checkpoint.STATE_FILE).read_text())["step"] == stopped_at
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": stopped_at, "stopped": "SIGTERM"} in records

    assert main(["distill", "--config", str(recipe)]) == 0  # resume (auto) and finish
    assert (run / "summary.json").exists()
    _assert_same_weights(load_file(str(run / "final" / "model.safetensors")), _reference(raw, tmp_path))


def test_sigint_between_steps_checkpoints_and_restores_handlers(
    tiny_run_config, tmp_path, monkeypatch, capsys
):
    """In-process: the handler only sets a flag; the loop stops after the step, at an odd step."""
    raw, recipe = _recipe(tiny_run_config, tmp_path, "interrupted")
    run = Path(raw["training"]["output_dir"])
    step = Distiller.train_step

    def interrupt_at_3(self, mb):
        if self.state.step == 2:  # the third step: SIGINT arrives while it runs
            signal.raise_signal(signal.SIGINT)
        return step(self, mb)

    monkeypatch.setattr(Distiller, "train_step", interrupt_at_3)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main(["distill", "--config", str(recipe)]) == 130
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("sakd: stopped by SIGINT at step 3;")
    assert [p.name for p in checkpoint.list_complete(run / "checkpoints")] == [
        "step-00000002",
        "step-00000003",
    ]
    assert _trained_steps(run) == [1, 2, 3]
    assert not (run / "summary.json").exists() and not (run / "final").exists()


# ------------------------------------------------------------------------------ damaged checkpoints


@pytest.fixture()
def saved_run(tiny_run_config, tmp_path) -> Path:
    """A finished run with checkpoints at steps 2, 4, 6, 8."""
    raw, _ = _recipe(tiny_run_config, tmp_path, "saved")
    raw["training"].update(keep_last_n=10)
    cfg, _ = load_config(raw)
    Distiller(cfg, resume="none", overwrite=True).train()
    return Path(raw["training"]["output_dir"])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated"),
        (lambda c: (c / "optimizer.bin").unlink(), "missing optimizer.bin"),
        (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin is truncated"),
        (
            lambda c: (c / "model.safetensors").write_bytes(b"\x05" + b"\x00" * 7 + b"{oops"),
            "unreadable header",
        ),
    ],
    ids=["truncated-weights", "missing-optimizer", "truncated-optimizer", "garbled-header"],
)
def test_damaged_checkpoint_is_reported_kept_and_skipped(saved_run, caplog, damage, reason):
    ckpts = saved_run / "checkpoints"
    newest = ckpts / "step-00000008"
    assert checkpoint.problem(newest) is None
    damage(newest)
    assert reason in checkpoint.problem(newest)
    with caplog.at_level(logging.WARNING, logger="sakd.training.checkpoint"):
        assert checkpoint.latest(ckpts) == ckpts / "step-00000006"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "\n" not in warnings[0]
    assert newest.is_dir()  # evidence is not deleted


def test_resume_falls_back_past_a_damaged_checkpoint(saved_run, caplog):
    ckpts = saved_run / "checkpoints"
    _truncate(ckpts / "step-00000008" / "model.safetensors")
    (ckpts / "step-00000006" / "optimizer.bin").unlink()
    cfg, _ = load_config(saved_run / "config.yaml")
    with caplog.at_level(logging.WARNING, logger="sakd.training.checkpoint"):
        d = Distiller(cfg, resume="auto")
    assert d.resumed_from == ckpts / "step-00000004" and d.state.step == 4
    assert sum("skipping damaged checkpoint" in r.getMessage() for r in caplog.records) == 2
    assert (ckpts / "step-00000008").is_dir() and (ckpts / "step-00000006").is_dir()

    with pytest.raises(RunDirError, match="damaged checkpoint"):
        Distiller(cfg, resume=str(ckpts / "step-00000006"))


def _fake_checkpoint(root: Path, step: int) -> Path:
    """A directory that passes :func:`checkpoint.problem` without a model (for pruning tests)."""
    from safetensors.torch import save_file

    path = root / checkpoint.checkpoint_name(step)
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.save({}, path / name)
    (path / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_pruning_keeps_the_new_the_resumed_from_and_damaged_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    resumed_from = _fake_checkpoint(root, 2)
    for step in (6, 8):  # newer checkpoints of an abandoned trajectory
        _fake_checkpoint(root, step)
    damaged = _fake_checkpoint(root, 10)
    (damaged / "optimizer.bin").unlink()
    acc = Accelerator()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    acc.prepare(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))

    new = checkpoint.save(acc, root, 3, {"step": 3}, keep_last_n=1, protect=[resumed_from])
    names = sorted(p.name for p in checkpoint.list_complete(root))
    # keep_last_n=1 keeps the newest whole one (8); the one just written (3), the one resumed from (2) and
    # the damaged one (10) are never deleted; only 6 goes.
    assert names == ["step-00000002", "step-00000003", "step-00000008", "step-00000010"]
    assert checkpoint.problem(new) is None

    checkpoint.save(acc, root, 10, {"step": 10}, keep_last_n=1)  # replacing a damaged one keeps it aside
    assert (root / "step-00000010.damaged" / checkpoint.STATE_FILE).is_file()
    assert checkpoint.latest(root) == root / "step-00000010"


class _Planted:
    """Unpickling this runs code: what a tampered checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(saved_run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    newest = saved_run / "checkpoints" / "step-00000008"
    torch.save({"state": _Planted(marker)}, newest / "optimizer.bin")
    (saved_run / "summary.json").unlink()
    cfg_path = saved_run / "config.yaml"
    rc = main(["distill", "--config", str(cfg_path), "training.max_steps=10"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot resume from" in err[0] and "step-00000008" in err[0]
    assert not marker.exists()  # torch.load(weights_only=True) refused it: nothing ran
