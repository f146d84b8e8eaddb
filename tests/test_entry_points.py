"""The `sakd` command's entry points: fast help (no heavy imports), one-line errors with nothing from the
libraries underneath, overrides anywhere among the options, and progress that suits a log file."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sakd.progress import Progress

HEAVY = ("torch", "transformers", "accelerate", "deepspeed", "bitsandbytes", "datasets", "peft")
COMMANDS = ["distill", "demo", "export", "eval", "bench", "report", "plan", "cache-teacher", "assets"]


def _imported_after(argv: list[str]) -> tuple[list[str], str, int]:
    """Run sakd's main(argv) in a fresh interpreter; the heavy modules it imported, its stderr, exit code."""
    code = (
        "import sys\nfrom sakd.commands.main import main\n"
        f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), rc)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    mods, rc = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    return eval(mods), out.stderr, int(rc)


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in COMMANDS]])
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    mods, _, rc = _imported_after(argv)
    assert rc == 0 and mods == []


def test_config_error_imports_no_heavy_library_and_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    for argv in (
        ["distill", "--config", str(missing)],
        ["plan", "--config", str(missing), "--gpu-memory", "16GB"],
        ["cache-teacher", "--config", str(missing), "--output", str(tmp_path / "c")],
    ):
        mods, err, rc = _imported_after(argv)
        assert (mods, rc) == ([], 2)
        assert err == f"sakd: error: config file not found: {missing}\n"


def test_overrides_may_sit_between_options(tmp_path: Path) -> None:
    """`--overwrite` between two overrides: both reach the config (the second one's bad key is what fails)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  max_steps: 2\n")
    argv = ["distill", "--config", str(recipe), "training.max_steps=1", "--overwrite", "data.nonsense=3"]
    mods, err, rc = _imported_after(argv)
    assert rc == 2 and mods == []
    assert err.startswith("sakd: error: ") and "data.nonsense" in err and err.count("\n") == 1
    from sakd.commands.main import parse_args

    args = parse_args(
        ["distill", "--config", "r", "a.b=1", "--overwrite", "c.d=2", "--resume", "none", "e.f=3"]
    )
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.overwrite and args.resume == "none"
    _, err, rc = _imported_after(["distill", "--config", str(recipe), "a.b=1", "--overwrite", "stray"])
    assert rc == 2 and "unrecognized arguments: stray" in err


def test_library_log_lines_and_warnings_stay_off_the_terminal_unless_debug() -> None:
    code = (
        "import logging, sys, warnings\nfrom sakd.commands import console\n"
        "console.setup(sys.argv[1] == 'debug')\n"
        "logging.getLogger('kernels._internals.hf_hub').warning('third-party log line')\n"
        "logging.getLogger('DeepSpeed').warning('own-handler library line')\n"
        "warnings.warn('third-party warning')\n"
        "logging.getLogger('sakd.training.loop').warning('our own warning')\n"
        "logging.getLogger('accelerate.state').error('a library error')\n"
        "logging.getLogger('DeepSpeed').error('a DeepSpeed error')\n"
    )
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, check=True)
    assert quiet.stderr == (
        "WARNING sakd.training.loop: our own warning\nERROR accelerate.state: a library error\n"
        "ERROR DeepSpeed: a DeepSpeed error\n"
    )
    loud = subprocess.run([sys.executable, "-c", code, "debug"], capture_output=True, text=True, check=True)
    assert "third-party log line" in loud.stderr and "third-party warning" in loud.stderr


def test_progress_off_a_terminal_is_a_plain_line_every_n_steps() -> None:
    stream = io.StringIO()  # not a tty: a log file, CI
    bar = Progress(12, desc="distill", every=5, stream=stream)
    for step in range(12):
        bar.advance(1, loss=f"{1 / (step + 1):.4f}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [ln.split(":")[0] for ln in lines] == ["distill"] * 3
    assert [ln.split()[1] for ln in lines] == ["5/12", "10/12", "12/12"]
    assert "loss 0.0833" in lines[-1] and "eta 0s" in lines[-1]


def test_progress_disabled_writes_nothing() -> None:
    stream = io.StringIO()
    bar = Progress(3, desc="x", enabled=False, stream=stream)
    for _ in range(3):
        bar.advance(1)
    assert stream.getvalue() == ""


@pytest.mark.integration
def test_distill_log_to_a_file_is_plain(tiny_run_config: dict, tmp_path: Path) -> None:
    """A run whose stderr is a file: one progress line per log_every steps, no carriage returns, and no
    line from the libraries underneath."""
    tiny_run_config["training"]["max_steps"] = 6
    tiny_run_config["logging"] = {"log_every": 3}
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(tiny_run_config))
    out = subprocess.run(
        [sys.executable, "-m", "sakd.cli", "distill", "--config", str(recipe)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr
    progress = [ln for ln in out.stderr.splitlines() if ln.startswith("distill: ")]
    assert [ln.split()[1] for ln in progress] == ["3/6", "6/6"]
    others = [ln for ln in out.stderr.splitlines() if ln not in progress]
    assert all(ln.startswith(("student optimizer groups", "  ")) for ln in others), others


def test_progress_lines_follow_the_count_after_a_resume() -> None:
    stream = io.StringIO()
    bar = Progress(10, desc="distill", every=4, initial=3, stream=stream)  # resumed at step 3
    for _ in range(7):
        bar.advance(1)
    assert [ln.split()[1] for ln in stream.getvalue().splitlines()] == ["4/10", "8/10", "10/10"]
