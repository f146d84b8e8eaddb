"""The shipped launch scripts, accelerate configs and DeepSpeed configs, checked as a user would use them."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))
RECIPE = "sakd/recipes/huihui-moe-1b-to-smollm-135m.yaml"

# What each shipped DeepSpeed config is meant to be: ZeRO stage, optimizer and parameter offload devices.
DS_INTENT = {
    "zero0.json": (0, None, None),
    "zero1.json": (1, None, None),
    "zero2.json": (2, None, None),
    "zero3.json": (3, None, None),
    "zero2_offload.json": (2, "cpu", None),
    "zero3_offload.json": (3, "cpu", "cpu"),
}


# ------------------------------------------------------------------------------------ accelerate configs


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    assert cfg.num_processes >= 1
    assert raw["compute_environment"] == "LOCAL_MACHINE"
    assert cfg.num_processes % cfg.num_machines == 0, "num_processes is the total over all machines"
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        ds_file = cfg.deepspeed_config["deepspeed_config_file"]
        assert (ROOT / ds_file).is_file(), f"{path.name} names {ds_file}, which does not exist"
        assert "zero_optimization" in json.loads((ROOT / ds_file).read_text())  # Accelerate requires it
        # With deepspeed_config_file, `accelerate launch` rejects a mixed_precision from the config file
        # ("the following accelerate config variables will be ignored"); the JSON's "auto" decides.
        assert "mixed_precision" not in raw
        assert cfg.mixed_precision is None


def test_accelerate_configs_shipped():
    names = {p.name for p in (ROOT / "accelerate_configs").glob("*.yaml")}
    assert {
        "cpu_single.yaml",
        "cpu_2proc.yaml",
        "p100_fp16.yaml",
        "multi_gpu_ddp.yaml",
        "ds_zero2.yaml",
        "ds_zero3.yaml",
        "multi_node.yaml",
    } <= names
    from accelerate.commands.config.config_args import load_config_from_file

    p100 = load_config_from_file(str(ROOT / "accelerate_configs" / "p100_fp16.yaml"))
    assert (p100.num_processes, p100.mixed_precision, p100.use_cpu) == (1, "fp16", False)
    cpu2 = load_config_from_file(str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"))
    assert (cpu2.num_processes, cpu2.distributed_type.value, cpu2.use_cpu) == (2, "MULTI_CPU", True)
    node = load_config_from_file(str(ROOT / "accelerate_configs" / "multi_node.yaml"))
    assert (node.num_machines, node.num_processes, node.machine_rank) == (2, 8, 0)
    for name, stage in (("ds_zero2.yaml", 2), ("ds_zero3.yaml", 3)):
        cfg = load_config_from_file(str(ROOT / "accelerate_configs" / name))
        assert cfg.deepspeed_config == {
            "deepspeed_config_file": f"ds_configs/zero{stage}.json",
            "zero3_init_flag": False,
        }


# ------------------------------------------------------------------------------------- DeepSpeed configs


def _autos(node, where=""):
    """Every dotted key whose value is still "auto", anywhere in a nested dict/list."""
    if node == "auto":
        return [where or "<root>"]
    if isinstance(node, dict):
        return [a for k, v in node.items() for a in _autos(v, f"{where}.{k}" if where else k)]
    if isinstance(node, list):
        return [a for i, v in enumerate(node) for a in _autos(v, f"{where}[{i}]")]
    return []


def _run_config(mixed_precision):
    from sakd.config import RunConfig

    cfg = RunConfig()
    cfg.training.mixed_precision = mixed_precision
    cfg.training.batch_size = 3
    cfg.training.gradient_accumulation_steps = 5
    cfg.optimization.max_grad_norm = 0.5
    return cfg


def test_ds_configs_shipped():
    assert {p.name for p in DS_CONFIGS} == set(DS_INTENT)


@pytest.mark.parametrize("mixed_precision", ["no", "fp16", "bf16"])
@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_fills_and_parses(path, mixed_precision, monkeypatch):
    """Filled from a sakd config for 2 processes, every shipped config passes DeepSpeed's own parser."""
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    from sakd.config.deepspeed import fill_ds_config, load_ds_config

    raw = load_ds_config(path)
    assert "optimizer" not in raw and "scheduler" not in raw  # sakd passes its own to DeepSpeed
    assert raw["zero_allow_untested_optimizer"] is True  # bitsandbytes 8-bit optimizers as client optimizers
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert raw[key] == "auto"
    assert raw["gradient_clipping"] == "auto"
    assert raw["fp16"]["enabled"] == "auto" and raw["bf16"] == {"enabled": "auto"}

    ds = fill_ds_config(raw, _run_config(mixed_precision), world_size=2)
    assert _autos(ds) == []
    assert ds["train_batch_size"] == 3 * 5 * 2
    assert raw["fp16"]["enabled"] == "auto"  # the file's dict is not modified

    # Without a process group DeepSpeedConfig takes world size 1 (its dist.get_rank() raises and it
    # falls back), and then rejects train_batch_size = micro * accumulation * 2. Show it a world of 2.
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *a, **k: 2)
    parsed = DeepSpeedConfig(ds)

    stage, offload_optimizer, offload_param = DS_INTENT[path.name]
    zero = parsed.zero_config
    assert parsed.world_size == 2
    assert parsed.zero_optimization_stage == stage
    assert (zero.offload_optimizer.device if zero.offload_optimizer else None) == offload_optimizer
    assert (zero.offload_param.device if zero.offload_param else None) == offload_param
    assert parsed.float16_config.enabled is (mixed_precision == "fp16")
    assert parsed.bfloat16_config.enabled is (mixed_precision == "bf16")
    assert parsed.train_micro_batch_size_per_gpu == 3
    assert parsed.gradient_accumulation_steps == 5
    assert parsed.train_batch_size == 30
    assert parsed.gradient_clipping == 0.5
    assert parsed.zero_allow_untested_optimizer is True
    if mixed_precision == "fp16":  # dynamic loss scaling
        fp16 = parsed.float16_config
        assert (fp16.loss_scale, fp16.initial_scale_power, fp16.loss_scale_window) == (0, 16, 1000)
        assert (fp16.hysteresis, fp16.min_loss_scale) == (2, 1)
    if stage == 3:
        assert zero.gather_16bit_weights_on_model_save is True  # filled: the export needs whole weights
        assert zero.prefetch_bucket_size > 0 and zero.param_persistence_threshold > 0


def test_ds_config_world_size_without_process_group():
    """DeepSpeedConfig outside a process group sees one process: a fill without a world size (DeepSpeed
    derives train_batch_size) parses, a fill for 2 processes does not."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from sakd.config.deepspeed import fill_ds_config, load_ds_config

    raw = load_ds_config(ROOT / "ds_configs" / "zero2.json")
    cfg = _run_config("no")
    unsized = fill_ds_config(raw, cfg, world_size=None)
    assert "train_batch_size" not in unsized and _autos(unsized) == []
    parsed = DeepSpeedConfig(unsized)
    assert (parsed.world_size, parsed.train_batch_size) == (1, 15)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        DeepSpeedConfig(fill_ds_config(raw, cfg, world_size=2))


# ----------------------------------------------------------------------------------------- launch scripts

SHIPPED_PATH = re.compile(
    r"(?:ds_configs/[\w.-]+\.json|accelerate_configs/[\w.-]+\.yaml|sakd/recipes/[\w.-]+\.yaml)"
)


def test_launch_scripts_shipped():
    assert {"cpu_smoke.sh", "p100.sh", "multi_gpu.sh", "multi_node.sh"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_syntax_and_references(path):
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & stat.S_IXUSR, f"{path.name} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    for line in ("set -euo pipefail", 'cd "$(dirname "$0")/.."', 'PY="${PYTHON:-.venv/bin/python}"'):
        assert line in text, f"{path.name} lacks {line!r}"
    assert re.search(r"(-m|--module) \\?\s*sakd\.cli", text), f"{path.name} does not run `-m sakd.cli`"
    referenced = set(SHIPPED_PATH.findall(text))
    assert referenced, f"{path.name} references no config"
    missing = sorted(p for p in referenced if not (ROOT / p).is_file())
    assert not missing, f"{path.name} references missing files: {missing}"


def test_hostfile_example_parses():
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (ROOT / "launch" / "hostfile.example").read_text().splitlines()
    assert dict(_parse_hostfile(lines)) == {"node-0": 4, "node-1": 4}


@pytest.fixture()
def stub_python(tmp_path):
    """A PYTHON that only records its arguments (and ACCELERATE_USE_CPU), one JSON line per call."""
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python"
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'use_cpu': os.environ.get('ACCELERATE_USE_CPU')}) + '\\n')\n"
    )
    stub.chmod(0o755)

    def run(script, *args, **env):
        base = {k: v for k, v in os.environ.items() if k not in ("ZERO", "LAUNCHER", "ACCELERATE_USE_CPU")}
        proc = subprocess.run(
            [str(ROOT / "launch" / script), *args],
            env={**base, "PYTHON": str(stub), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, calls

    return run


def _sakd_args(argv):
    """The arguments after `-m sakd.cli` / `--module sakd.cli`, checked by sakd's own parser and loader."""
    from sakd.commands.main import build_parser
    from sakd.config import load_config

    i = argv.index("sakd.cli")
    assert argv[i - 1] in ("-m", "--module")
    args = build_parser().parse_args(argv[i + 1 :])
    assert args.command == "distill"
    cfg, _ = load_config(ROOT / args.config, args.overrides)
    return argv[:i], cfg


# (script, args, env) -> launcher prefix fragments expected, sakd config values expected, ACCELERATE_USE_CPU
WIRING = {
    "p100": (
        ("p100.sh", ["OUT", "training.max_steps=7"], {}),
        ["accelerate.commands.launch", "--config_file", "accelerate_configs/p100_fp16.yaml"],
        {"optimizer": "adamw_8bit", "precision": "fp16", "teacher_dtype": "float16", "deepspeed": None},
    ),
    "multi_gpu-deepspeed": (
        ("multi_gpu.sh", ["4", "OUT", "training.max_steps=7"], {}),
        [
            "deepspeed.launcher.runner",
            "--num_gpus",
            "4",
            "--master_port",
            "29500",
            "--no_local_rank",
            "--module",
        ],
        {"deepspeed": "ds_configs/zero2.json"},
    ),
    "multi_gpu-deepspeed-zero3_offload": (
        ("multi_gpu.sh", ["2", "OUT", "training.max_steps=7"], {"ZERO": "3_offload"}),
        ["deepspeed.launcher.runner", "--num_gpus", "2"],
        {"deepspeed": "ds_configs/zero3_offload.json"},
    ),
    "multi_gpu-accelerate-zero3": (
        ("multi_gpu.sh", ["4", "OUT", "training.max_steps=7"], {"LAUNCHER": "accelerate", "ZERO": "3"}),
        [
            "--config_file",
            "accelerate_configs/ds_zero3.yaml",
            "--deepspeed_config_file",
            "ds_configs/zero3.json",
        ],
        {"deepspeed": "ds_configs/zero3.json"},
    ),
    "multi_gpu-ddp": (
        ("multi_gpu.sh", ["4", "OUT", "training.max_steps=7"], {"ZERO": "none"}),
        ["--config_file", "accelerate_configs/multi_gpu_ddp.yaml", "--num_processes", "4"],
        {"deepspeed": None},
    ),
    "multi_node": (
        (
            "multi_node.sh",
            ["launch/hostfile.example", "OUT", "training.max_steps=7"],
            {"MASTER_ADDR": "10.1.2.3"},
        ),
        [
            "--hostfile",
            "launch/hostfile.example",
            "--master_addr",
            "10.1.2.3",
            "--master_port",
            "29500",
            "--no_local_rank",
        ],
        {"deepspeed": "ds_configs/zero2.json"},
    ),
    "smoke-1proc": (
        ("cpu_smoke.sh", ["OUT", "7"], {}),
        ["accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_single.yaml"],
        {"deepspeed": None, "use_cpu": None},
    ),
    "smoke-2proc-ddp": (
        ("cpu_smoke.sh", ["OUT", "7", "2"], {}),
        ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        {"deepspeed": None, "use_cpu": "1"},
    ),
    "smoke-2proc-zero3": (
        ("cpu_smoke.sh", ["OUT", "7", "2", "3"], {}),
        ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        {"deepspeed": "ds_configs/zero3.json", "use_cpu": None},
    ),
}


@pytest.mark.parametrize("case", list(WIRING))
def test_launch_script_wiring(case, stub_python, tmp_path):
    """Each script's final command, with PYTHON replaced by a recorder: the launcher and its options, and
    sakd arguments that sakd's own parser and config loader accept (no training is run)."""
    (script, args, env), prefix, want = WIRING[case]
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc, calls = stub_python(script, *args, **env)
    assert proc.returncode == 0, proc.stderr
    launch = calls[-1]
    launcher, cfg = _sakd_args(launch["argv"])
    joined = " ".join(launcher)
    assert " ".join(prefix) in joined, f"{joined!r} lacks {' '.join(prefix)!r}"
    assert cfg.training.deepspeed == want["deepspeed"]
    if script == "cpu_smoke.sh":
        assert launch["use_cpu"] == want["use_cpu"]
        assert cfg.training.max_steps == 7 and cfg.training.output_dir == str(tmp_path / "out" / "run")
    else:
        assert cfg.training.max_steps == 7  # pass-through overrides come last
        assert cfg.training.output_dir == str(tmp_path / "out")
        assert launch["argv"][launch["argv"].index("--config") + 1] == RECIPE
    if script == "p100.sh":
        assert cfg.optimization.optimizer == want["optimizer"]
        assert cfg.training.mixed_precision == want["precision"]
        assert cfg.model.teacher_dtype == want["teacher_dtype"]
        assert cfg.model.gradient_checkpointing is True


@pytest.mark.parametrize(
    "script,args,env",
    [
        ("multi_gpu.sh", ["2", "OUT"], {"ZERO": "9"}),
        ("multi_gpu.sh", ["2", "OUT"], {"LAUNCHER": "mpirun"}),
        ("multi_node.sh", ["no-such-hostfile", "OUT"], {}),
        ("cpu_smoke.sh", ["OUT", "1", "2", "9"], {}),
        ("p100.sh", [], {}),
    ],
    ids=["bad-zero", "bad-launcher", "no-hostfile", "smoke-bad-zero", "p100-no-out"],
)
def test_launch_script_rejects_bad_arguments(script, args, env, stub_python, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc, calls = stub_python(script, *args, **env)
    assert proc.returncode != 0
    assert not any("sakd.cli" in c["argv"] for c in calls), "a launcher was started"
