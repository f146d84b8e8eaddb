"""The launch scripts run as shipped, on CPU processes with tiny models: one process, two ranks under
each launcher, two "machines" on localhost, and the P100 script with fp16 swapped out."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow  # 20 s; the default tier runs multi_gpu.sh (below) and sakd distill itself
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


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "launcher,zero",
    [  # ZeRO-2 and DDP through the script in the slow tier (11 s each); the default tier trains both directly
        ("deepspeed", "3"),
        pytest.param("accelerate", "2", marks=pytest.mark.slow),
        pytest.param("deepspeed", "none", marks=pytest.mark.slow),
    ],
    ids=["ds-zero3", "acc-zero2", "ddp"],
)
def test_multi_gpu_script_runs_two_cpu_ranks(corpus, tokenizer_dir, tmp_path, launcher, zero):
    """launch/multi_gpu.sh as shipped (only the recipe's models/data swapped for tiny ones): the deepspeed
    launcher, accelerate launch, and plain DDP each start 2 ranks that really share the work."""
    run = tmp_path / "run"
    overrides = _tiny(corpus, tokenizer_dir)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "RECIPE": "sakd/recipes/demo.yaml",
        "ZERO": zero,
        "LAUNCHER": launcher,
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [str(ROOT / "launch" / "multi_gpu.sh"), "2", str(run), *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    # 2 steps x 2 ranks x 2 blocks x 31 predicted tokens: both ranks trained, each on its own blocks
    assert summary["steps"] == 2 and summary["tokens_seen"] == 2 * 2 * 2 * 31
    assert proc.stdout.count('"tokens_seen"') == 1  # one summary, from the main process
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.integration
def test_p100_script_runs_on_cpu_with_tiny_models(corpus, tokenizer_dir, tmp_path):
    """launch/p100.sh end to end (accelerate launch, its config, bitsandbytes AdamW8bit) with the models,
    data and fp16 swapped for what a CPU runs; fp16 itself needs the GPU."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [str(ROOT / "launch" / "p100.sh"), str(run), *_tiny(corpus, tokenizer_dir)]
        + ["training.mixed_precision=no", "model.teacher_dtype=float32", "data.dataset_config=null"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert "lr=" in proc.stdout  # the optimizer groups were printed: AdamW8bit built and trained


def _tiny(corpus, tokenizer_dir) -> list[str]:
    return [
        "model.teacher=tiny-moe",
        "model.student=tiny-dense",
        f"model.tokenizer={tokenizer_dir}",
        f"data.train={corpus}",
        "data.sample_by=document",  # the file as one text: no packing EOS (never a target) in the counts below
        "data.block_size=32",
        "data.max_eval_blocks=8",
        "training.max_steps=2",
        "training.batch_size=2",
        "training.eval_every=0",
        "logging.progress_bar=false",
    ]


def _free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow  # 19-30 s; multi_gpu.sh's runs stay in the default tier
def test_multi_node_accelerate_config_two_machines_on_localhost(corpus, tokenizer_dir, tmp_path):
    """accelerate_configs/multi_node.yaml as two "machines" (one process each) on this host, started
    separately the way each node starts its own `accelerate launch`: they meet, and share the work."""
    run, port = tmp_path / "run", str(_free_port())
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "accelerate_configs/multi_node.yaml",
    ]
    cmd += ["--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1"]
    cmd += ["--main_process_port", port]
    sakd = ["-m", "sakd.cli", "distill", "--config", "sakd/recipes/demo.yaml", f"training.output_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [*cmd, "--machine_rank", str(r), *sakd, *_tiny(corpus, tokenizer_dir)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens_seen"] == 2 * 2 * 2 * 31  # 2 steps x 2 ranks x 2 blocks x 31 predicted tokens


@pytest.mark.multiprocess
@pytest.mark.slow  # 19-30 s; multi_gpu.sh's runs stay in the default tier
def test_multi_node_script_with_a_single_host_hostfile(corpus, tokenizer_dir, tmp_path):
    """launch/multi_node.sh through DeepSpeed's runner with a hostfile. DeepSpeed checks each host over
    ssh first; a stand-in `ssh` answers for localhost (this machine has no ssh server). With one host the
    runner starts the ranks itself: the pdsh fan-out to other machines is not exercised here."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh").write_text("#!/bin/sh\nexit 0\n")
    (fake / "ssh").chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "RECIPE": "sakd/recipes/demo.yaml",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [str(ROOT / "launch" / "multi_node.sh"), str(hostfile), str(run), *_tiny(corpus, tokenizer_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["tokens_seen"] == 2 * 2 * 2 * 31
