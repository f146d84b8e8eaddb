"""A LoRA student under DDP, ZeRO-2 and ZeRO-3 (2 CPU processes, tests/workers/dist_worker.py): the same
logged losses and merged final weights as one process accumulating the same global batch; under ZeRO-3
the checkpoint (DeepSpeed's shards, frozen base included) exports merged and resumes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "workers" / "dist_worker.py"
STEPS, MICRO = 4, 2


def _recipe(tiny_run_config: dict, out: Path, **training) -> dict:
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["peft"] = {"method": "lora", "rank": 4, "alpha": 8.0}
    raw["optimization"].update(learning_rate=1e-2)
    raw["distillation"]["feature"] = {"weight": 0.5}  # trainable projections next to a frozen base
    raw["training"].update(
        output_dir=str(out / "run"),
        max_steps=STEPS,
        batch_size=MICRO,
        save_every=2,
        keep_last_n=3,
        **training,
    )
    return raw


def _launch(raw: dict, out: Path, resume: str = "none") -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(out / "recipe.json"), str(out), resume],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.fixture(scope="module")
def reference(tiny_run_config_module, tmp_path_factory):
    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    out = tmp_path_factory.mktemp("single")
    cfg, _ = load_config(_recipe(tiny_run_config_module, out, gradient_accumulation_steps=2))
    Distiller(cfg, resume="none", overwrite=True).train()
    return {
        "losses": _losses(out / "run"),
        "final": load_file(str(out / "run" / "final" / "model.safetensors")),
    }


def _check(run: Path, reference: dict, atol: float) -> None:
    losses = _losses(run)
    assert losses == pytest.approx(reference["losses"], rel=10 * atol, abs=10 * atol)
    final = load_file(str(run / "final" / "model.safetensors"))  # merged: the base's names, no adapters
    assert final.keys() == reference["final"].keys() and not any("lora" in k for k in final)
    for k in final:
        torch.testing.assert_close(final[k], reference["final"][k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_lora_ddp_and_zero2(tiny_run_config_module, reference, tmp_path, mode):
    training = {} if mode == "ddp" else {"deepspeed": str(ROOT / "ds_configs/zero2.json")}
    ranks = _launch(_recipe(tiny_run_config_module, tmp_path, **training), tmp_path)
    assert ranks[0]["zero_stage"] == (-1 if mode == "ddp" else 2)
    _check(tmp_path / "run", reference, atol=1e-6 if mode == "ddp" else 1e-5)


def test_lora_zero3_partitions_exports_merged_and_resumes(tiny_run_config_module, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    from sakd.training.export import export_run

    raw = _recipe(tiny_run_config_module, tmp_path, deepspeed=str(ROOT / "ds_configs/zero3.json"))
    ranks = _launch(raw, tmp_path)
    assert ranks[0]["zero_stage"] == 3
    (m0, full), (m1, _) = ranks[0]["student_held"], ranks[1]["student_held"]
    assert 0.45 * full <= m0 <= 0.55 * full and m0 + m1 >= full  # the frozen base is partitioned too
    run = tmp_path / "run"
    _check(run, reference, atol=1e-5)
    ckpt = run / "checkpoints" / "step-00000004"
    assert (ckpt / "pytorch_model").is_dir()
    exported = AutoModelForCausalLM.from_pretrained(export_run(run, tmp_path / "exported"))
    final = load_file(str(run / "final" / "model.safetensors"))
    for k, v in exported.state_dict().items():
        if k in final:
            torch.testing.assert_close(v, final[k], rtol=0, atol=1e-6, msg=k)
    shutil.rmtree(ckpt)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    resumed = _launch(raw, tmp_path, resume="auto")
    assert resumed[0]["start_step"] == 2
    again = load_file(str(run / "final" / "model.safetensors"))
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=0, atol=1e-6, msg=k)
