"""The shipped launch scripts and accelerate configs run as a user would run them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1
    assert yaml.safe_load(path.read_text())["compute_environment"] == "LOCAL_MACHINE"


@pytest.mark.integration
def test_cpu_smoke_script(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        [str(ROOT / "launch" / "cpu_smoke.sh"), str(tmp_path), "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
