"""``sakd.integrations.DistillationTrainer``: ``Trainer.train()`` on tiny models gives the losses and weights
of ``sakd distill`` on the same batches (one tokenizer and across tokenizers, with an auxiliary term, each
policy, stages); the example script runs, in one process and in two (DDP, ZeRO-2, ZeRO-3 with the teacher
partitioned by its own engine). Checkpoints and hooks: test_integrations_hooks.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainingArguments

from sakd.config import PeftConfig
from sakd.integrations import DistillationCollator, DistillationTrainer
from sakd.integrations.hf_trainer import AUX_FILE
from sakd.models import load_model, load_tokenizer
from sakd.models.peft import wrap_student

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "hf_trainer.py"
STEPS, BATCH = 3, 4


@pytest.fixture(autouse=True)
def _keep_environment():
    """TrainingArguments and Accelerate write process-wide environment variables; later tests launch
    subprocesses with this environment."""
    with mock.patch.dict(os.environ):
        yield


@pytest.fixture(scope="module")
def teacher_tokenizer_dir(corpus, tmp_path_factory):
    from sakd.commands.demo import train_tokenizer

    return train_tokenizer(corpus, tmp_path_factory.mktemp("ttok") / "teacher_tok", 300)


def _args(out: Path, **kw) -> TrainingArguments:
    """The sakd recipe's optimizer and schedule (tests/conftest.py) as TrainingArguments."""
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=1e-3,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        max_grad_norm=1.0,
        optim="adamw_torch",
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**base, **kw})


def _reference(make_distiller, raw: dict) -> dict:
    """``sakd distill`` for STEPS steps; what the Trainer needs to repeat it: the blocks in the order the
    run read them, the initial projections, the losses and weights it ended with."""
    d = make_distiller(raw, max_steps=STEPS, batch_size=BATCH)
    order = [i for s in range(STEPS) for mb in d.plan.micro_batches(0, s, 0) for i in mb]
    aux0 = None if d.aux_terms is None else {k: v.clone() for k, v in d.aux_terms.state_dict().items()}
    student0 = {k: v.clone() for k, v in d.hf_student.state_dict().items()}
    d.train()
    metrics = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "rows": d.data.train.select(order).add_column("sample_id", order),  # each row's block id
        "data": d.data,
        "aux0": aux0,
        "student0": student0,
        "metrics": [m for m in metrics if "loss" in m],
        "student": {k: v.clone() for k, v in d.hf_student.state_dict().items()},
        "aux": None if d.aux_terms is None else d.aux_terms.state_dict(),
    }


@pytest.mark.parametrize(
    ("cross", "sparse"),
    [(False, None), (False, "topk_tail"), (True, None), (False, "ka")],
    ids=["same", "sparse", "cross", "ka"],
)
def test_trainer_repeats_sakd_distill(
    tiny_run_config, make_distiller, tokenizer_dir, teacher_tokenizer_dir, tmp_path, cross, sparse
):
    """ka: Knowledge Augmentation (every token's experts sampled) draws what sakd distill draws: the same
    seed (TrainingArguments.seed = training.seed = 3), step and block ids (the rows' sample_id). sparse:
    a stored-style sparse mode with every auxiliary term (feature, attention, contrastive) on a LoRA
    student."""
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["feature"] = {"weight": 0.5}
    seed = 0
    if sparse == "ka":
        raw["distillation"]["moe"] = {"augment_samples": 2, "augment_sampling_prob": 1.0}
        raw["training"]["seed"] = seed = 3
    elif sparse:  # with the other auxiliary terms and a LoRA student (the base frozen, adapters trained)
        raw["distillation"]["loss"].update(sparse=sparse, kd_top_k=16)
        raw["distillation"].update(attention={"weight": 0.5}, contrastive={"weight": 0.5})
        raw["model"]["peft"] = {"method": "lora", "rank": 4, "alpha": 8.0}
    if cross:
        raw["model"]["teacher_tokenizer"] = str(teacher_tokenizer_dir)
        raw["distillation"]["alignment"] = {"cache_dir": str(tmp_path / "vocab_maps")}
    ref = _reference(make_distiller, raw)
    tok = load_tokenizer(str(tokenizer_dir))
    teacher_tok = load_tokenizer(str(teacher_tokenizer_dir)) if cross else tok
    student = load_model("tiny-dense", tokenizer=tok, seed=seed)  # what build_student made (training.seed)
    if "peft" in raw["model"]:  # a LoRA student; its adapters' random init: the run's
        student = wrap_student(student, PeftConfig(**raw["model"]["peft"]), gradient_checkpointing=False)
        student.load_state_dict(ref["student0"])
    teacher = load_model("tiny-moe", tokenizer=teacher_tok, seed=seed + 1)  # load_teacher's seed + 1
    trainer = DistillationTrainer(
        student,
        _args(tmp_path / "hf", seed=seed),
        teacher=teacher,
        teacher_tokenizer=teacher_tok,
        distillation=raw["distillation"],
        train_dataset=ref["rows"],
        data_collator=DistillationCollator(ref["data"]),
        processing_class=tok,
    )
    trainer.model.aux.load_state_dict(ref["aux0"])  # the projections' random init: the run's
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    terms = [k for k in ("feature", "attention", "contrastive") if raw["distillation"].get(k)]
    for key in ("loss", "kd", "ce", *terms):
        assert [h[key] for h in logs] == pytest.approx([m[key] for m in ref["metrics"]], rel=1e-5), key
    assert [h["tokens"] for h in logs] == [m["tokens"] for m in ref["metrics"]]
    if cross:
        assert all(0 < h["kd_positions"] <= 1 for h in logs)
    for k, v in trainer.student.state_dict().items():
        torch.testing.assert_close(v, ref["student"][k], rtol=0, atol=1e-6, msg=k)
    for k, v in trainer.model.aux.state_dict().items():
        torch.testing.assert_close(v, ref["aux"][k], rtol=0, atol=1e-6, msg=k)


STEP_PARTS = {
    "curriculum": ({"curriculum": {"phases": True, "balance": True, "structure_start": 0.0}}, "mult_feature"),
    "token router": (
        {"router": {"enabled": True, "sharpen_start": 0.0, "sharpen_end": 0.5}},
        "router_w_mean",
    ),
    "student-aware router": ({"moe": {"student_aware_router": True, "router_lr": 1e-2}}, "sar_kd"),
}


@pytest.mark.parametrize("part", list(STEP_PARTS))
def test_each_per_step_part_under_the_trainer_repeats_sakd_distill(
    part, tiny_run_config, make_distiller, tokenizer_dir, tmp_path
):
    """The curriculum, the token router and the Student-Aware Router run as sakd distill's per-step hooks
    inside DistillationTrainer (a TrainerCallback): the same losses and the same metric of the part."""
    change, key = STEP_PARTS[part]
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["feature"] = {"weight": 0.5}
    raw["distillation"].update(copy.deepcopy(change))
    ref = _reference(make_distiller, raw)
    tok = load_tokenizer(str(tokenizer_dir))
    trainer = DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        _args(tmp_path / "hf", seed=0),
        teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
        distillation=raw["distillation"],
        train_dataset=ref["rows"],
        data_collator=DistillationCollator(ref["data"]),
        processing_class=tok,
    )
    trainer.model.aux.load_state_dict(ref["aux0"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for name in ("loss", "kd", "ce", "feature", key):
        assert [h[name] for h in logs] == pytest.approx([m[name] for m in ref["metrics"]], rel=1e-5), name


def _tiny_trainer(tokenizer_dir, corpus, out: Path, distillation: dict | None = None, **kw):
    from sakd.integrations import prepare_distillation_data

    tok = load_tokenizer(str(tokenizer_dir))
    data = prepare_distillation_data({"train": str(corpus), "block_size": 32, "max_eval_blocks": 8}, tok)
    args = _args(out, **{"save_strategy": "no", **kw.pop("args", {})})
    return DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        args,
        teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
        distillation=distillation or {"feature": {"weight": 0.5}},
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tok,
        **kw,
    )


@pytest.fixture(scope="module")
def example_run(tokenizer_dir, corpus, tmp_path_factory):
    """Tiny student and teacher saved as model directories, and the example script run on them in one
    process, accumulating 2 micro-batches of 2 blocks per step (the global batch of 2 ranks x 2)."""
    tmp = tmp_path_factory.mktemp("example")
    tok = load_tokenizer(str(tokenizer_dir))
    dirs = {}
    for role, preset, seed in (("student", "tiny-dense", 0), ("teacher", "tiny-moe", 1)):
        dirs[role] = tmp / role
        load_model(preset, tokenizer=tok, seed=seed).save_pretrained(dirs[role])
        tok.save_pretrained(dirs[role])
    common = [
        *("--student", str(dirs["student"]), "--teacher", str(dirs["teacher"]), "--data", str(corpus)),
        *("--block_size", "32", "--max_steps", "3", "--per_device_train_batch_size", "2"),
        *("--train_sampling_strategy", "sequential", "--report_to", "none", "--save_strategy", "no"),
        *("--logging_steps", "1", "--feature_weight", "0.5", "--disable_tqdm", "true"),
    ]
    out = tmp / "one"
    _run(
        [
            sys.executable,
            str(EXAMPLE),
            *common,
            "--output_dir",
            str(out),
            "--gradient_accumulation_steps",
            "2",
        ]
    )
    return {"common": common, "out": out, "tmp": tmp}


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _logged(out: Path) -> list[dict]:
    return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_example_script_trains_and_saves_a_plain_model(example_run):
    out = example_run["out"]
    losses = [h["loss"] for h in _logged(out)]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any(k.startswith("aux") for k in model.state_dict()) and (out / AUX_FILE).is_file()


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_example_script_on_two_processes(example_run, mode):
    """2 ranks x 1 micro-batch: the single process's logged losses and weights (DDP, ZeRO-2, ZeRO-3); under
    ZeRO-3 the student and the teacher (its own engine) are partitioned, half on each rank."""
    out = example_run["tmp"] / mode
    if mode == "ddp":
        extra = ["--use_cpu", "true"]
    elif mode == "zero2":
        extra = ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]
    else:  # save_model gathers the ZeRO-3 shards into one file only when the config says so (HF's rule)
        ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        (example_run["tmp"] / "zero3.json").write_text(json.dumps(ds))
        extra = ["--deepspeed", str(example_run["tmp"] / "zero3.json")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    worker = str(ROOT / "tests" / "workers" / "hf_trainer_worker.py")
    _run([*launcher, worker, *example_run["common"], "--output_dir", str(out), *extra])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world"], r["rank"]) for r in ranks] == [(2, 0), (2, 1)]
    atol = 1e-6 if mode == "ddp" else 1e-5
    ref = _logged(example_run["out"])
    for key in ("loss", "kd", "ce", "feature", "tokens"):
        assert [h[key] for h in _logged(out)] == pytest.approx([h[key] for h in ref], rel=10 * atol), key
    a, b = load_file(str(out / "model.safetensors")), load_file(str(example_run["out"] / "model.safetensors"))
    if mode == "zero2":  # the Trainer saves ZeRO-2's state dict as it is: the tied head written twice
        torch.testing.assert_close(a.pop("lm_head.weight"), a["model.embed_tokens.weight"], rtol=0, atol=0)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
    if mode == "zero3":
        assert ranks[0]["teacher"] == "DeepSpeedEngine"
        for who in ("student_held", "teacher_held"):
            (m0, full), (m1, _) = ranks[0][who], ranks[1][who]
            assert 0.4 * full <= m0 <= 0.6 * full and m0 + m1 >= full, who


def test_sampled_draws_follow_the_trainers_seed(tokenizer_dir, corpus, tmp_path):
    """sparse=sampled without a cache: the draws are seeded by TrainingArguments.seed (review of issue 21:
    they were seeded by a default config's 42 whatever the Trainer's seed), so two seeds give two losses
    from the same batch and weights, and one seed gives one."""
    distillation = {"loss": {"sparse": "sampled", "num_samples": 4, "temperature": 1.0}}
    losses = []
    for seed in (5, 6, 5):
        trainer = _tiny_trainer(
            tokenizer_dir, corpus, tmp_path / f"s{seed}", distillation, args={"seed": seed}
        )
        assert trainer.objective.seed == seed
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(trainer.model, batch)))
    assert losses[0] == losses[2] and losses[0] != losses[1]


@pytest.mark.parametrize("policy", ["on", "mixed", "sequence"])
def test_each_policy_under_the_trainer_repeats_sakd_distill(
    policy, tiny_run_config, make_distiller, tokenizer_dir, tmp_path
):
    """distillation.policy under DistillationTrainer: the student (the teacher for sequence) writes from the
    step's prompts as in sakd distill -- the same seeds (TrainingArguments.seed, step, block ids), the same
    objective at T = 1 on the student's samples -- so the losses, the generated tokens and the weights are
    sakd distill's; and the Trainer splits each step into 2 micro-batches of 2 where sakd distill reads 1 of
    4, so the step's update does not depend on the split. mixed's seed-0 draws: steps 0, 1 on-policy, 2 off."""
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["feature"] = {"weight": 0.5}
    generation = {"prompt_tokens": 8, "max_new_tokens": 6, "eval_prompts": 0, "fraction": 0.5}
    if policy == "sequence":
        generation["sequence_loss"] = "kd"
    raw["distillation"].update(policy=policy, generation=generation)
    ref = _reference(make_distiller, raw)
    tok = load_tokenizer(str(tokenizer_dir))
    trainer = DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        _args(tmp_path / "hf", seed=0, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
        distillation=raw["distillation"],
        train_dataset=ref["rows"],
        data_collator=DistillationCollator(ref["data"]),
        processing_class=tok,
    )
    trainer.model.aux.load_state_dict(ref["aux0"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["policy_step"] for h in logs] == [m["policy_step"] for m in ref["metrics"]]
    if policy == "mixed":
        assert [h["policy_step"] for h in logs] == [1, 1, 0]
    assert logs[0]["gen_tokens"] > 0  # the first step of each policy generates
    _assert_repeats(trainer, logs, ref)


def test_stages_under_the_trainer_repeat_sakd_distill(
    tiny_run_config, make_distiller, tokenizer_dir, tmp_path
):
    """optimization.stages under DistillationTrainer (TrainerStages: each stage's optimizer and schedule from
    its first step on, built as sakd distill builds them): stage 0 trains with the embeddings frozen, stage
    1 everything at another peak LR -- the same losses and weights as sakd distill with those stages."""
    from sakd.integrations import TrainerStages

    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["feature"] = {"weight": 0.5}
    raw["distillation"]["curriculum"] = {"balance": True}
    stages = [{"steps": 2, "lr_multipliers": {"embed_tokens": 0.0}}, {"steps": 2, "learning_rate": 5e-4}]
    raw["optimization"]["stages"] = stages
    d = make_distiller(raw, batch_size=BATCH)
    order = [i for s in range(4) for mb in d.plan.micro_batches(0, s, 0) for i in mb]
    aux0 = {k: v.clone() for k, v in d.aux_terms.state_dict().items()}
    embed0 = d.hf_student.get_input_embeddings().weight.detach().clone()
    d.train()
    metrics = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "loss" in m]
    tok = load_tokenizer(str(tokenizer_dir))
    trainer = DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        _args(tmp_path / "hf", seed=0, max_steps=4),
        teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
        distillation=raw["distillation"],
        train_dataset=d.data.train.select(order).add_column("sample_id", order),
        data_collator=DistillationCollator(d.data),
        processing_class=tok,
    )
    trainer.model.aux.load_state_dict(aux0)
    trainer.add_callback(TrainerStages(trainer, raw["optimization"]))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for name in ("loss", "kd", "ce", "feature", "mult_kd"):
        assert [h[name] for h in logs] == pytest.approx([m[name] for m in metrics], rel=1e-5), name
    # the rate each step used: each stage warms up for 1 step to its own peak
    assert [h["learning_rate"] for h in logs] == pytest.approx([0.0, 1e-3, 0.0, 5e-4])
    state = trainer.student.state_dict()
    for k, v in d.hf_student.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(trainer.student.get_input_embeddings().weight, embed0)  # stage 1 trained them


def _assert_repeats(trainer, logs: list[dict], ref: dict) -> None:
    """The Trainer's logged losses, token counts and final student weights equal sakd distill's ``ref``."""
    for name in ("loss", "kd", "ce", "feature"):
        assert [h[name] for h in logs] == pytest.approx([m[name] for m in ref["metrics"]], rel=1e-5), name
    for name in ("tokens", "gen_tokens"):
        assert [h.get(name) for h in logs] == [m.get(name) for m in ref["metrics"]], name
    for k, v in trainer.student.state_dict().items():
        torch.testing.assert_close(v, ref["student"][k], rtol=0, atol=1e-6, msg=k)
