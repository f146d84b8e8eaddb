"""``DistillationTrainer`` with the teacher signals that read each batch's block ids (the rows' ``sample_id``,
passed on by ``DistillationCollator``): Knowledge Augmentation draws anew per block, step and seed
(``TrainingArguments.seed``), and an offline teacher cache (``distillation.teacher_cache``) trains as
``sakd distill`` trains from it and resumes from a Trainer checkpoint to the uninterrupted run's weights."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from unittest import mock

import datasets
import pytest
import torch
from test_integrations import _args  # tests/ is on sys.path (pytest rootdir-less import)

from sakd.cli import main
from sakd.integrations import DistillationTrainer, prepare_distillation_data
from sakd.models import load_model, load_tokenizer

pytestmark = pytest.mark.integration

BLOCKS = 16  # blocks of the cache and of the runs that read it


@pytest.fixture(autouse=True)
def _keep_environment():
    with mock.patch.dict(os.environ):
        yield


def _ka_teacher_states(tokenizer_dir, corpus, out: Path, seed: int) -> list[tuple[int, torch.Tensor]]:
    """4 steps of 2 rows that all hold the same tokens (block ids 0..3, two steps per epoch) with KA on
    (2 samples, every token's experts sampled): per teacher forward, the Trainer's global step and the
    teacher's final hidden states ``[2 samples x 2 rows, L, H]`` (a hook on its last norm)."""
    tok = load_tokenizer(str(tokenizer_dir))
    data = prepare_distillation_data({"train": str(corpus), "block_size": 32, "max_eval_blocks": 8}, tok)
    block = data.train[0]["input_ids"].tolist()
    rows = datasets.Dataset.from_dict({"input_ids": [block] * 4, "sample_id": [0, 1, 2, 3]})
    teacher = load_model("tiny-moe", tokenizer=tok, seed=1)
    trainer = DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        _args(out, per_device_train_batch_size=2, max_steps=4, seed=seed),
        teacher=teacher,
        distillation={"moe": {"augment_samples": 2, "augment_sampling_prob": 1.0}},
        train_dataset=rows.with_format("torch"),
        data_collator=data.collator,
        processing_class=tok,
    )
    seen: list[tuple[int, torch.Tensor]] = []
    teacher.model.norm.register_forward_hook(
        lambda m, a, out: seen.append((trainer.state.global_step, out.detach().clone()))
    )
    trainer.train()
    return seen


def test_knowledge_augmentation_draws_per_block_step_and_seed(tokenizer_dir, corpus, tmp_path):
    """Identical tokens, so the teacher's states differ only where the expert draws do: every (step, block
    id, sample) draws anew; the same args.seed repeats the draws bit for bit, another seed changes all."""
    a = _ka_teacher_states(tokenizer_dir, corpus, tmp_path / "a", seed=5)
    assert [s for s, _ in a] == [0, 1, 2, 3]  # one forward per step, at the Trainer's global step
    states = torch.cat([h for _, h in a])  # 4 steps x (2 samples x 2 block ids)
    assert states.shape[0] == 16
    for i in range(16):
        for j in range(i):
            assert not torch.equal(states[i], states[j]), (i, j)
    again = torch.cat([h for _, h in _ka_teacher_states(tokenizer_dir, corpus, tmp_path / "b", seed=5)])
    assert torch.equal(again, states)
    other = torch.cat([h for _, h in _ka_teacher_states(tokenizer_dir, corpus, tmp_path / "c", seed=6)])
    assert all(not torch.equal(other[i], states[i]) for i in range(16))


@pytest.fixture(scope="module")
def cached(tiny_run_config_module, tmp_path_factory) -> dict:
    """A top-16 cache of the tiny teacher over the recipe's first 16 training blocks."""
    tmp = tmp_path_factory.mktemp("hf_cache")
    raw = copy.deepcopy(tiny_run_config_module)
    raw["data"]["max_train_blocks"] = BLOCKS
    raw["distillation"]["cache"] = {"mode": "topk_tail", "blocks_per_shard": 8, "batch_size": 4, "top_k": 16}
    raw["training"]["output_dir"] = str(tmp / "run")
    (tmp / "recipe.json").write_text(json.dumps(raw))
    argv = ["cache-teacher", "--config", str(tmp / "recipe.json"), "--output", str(tmp / "cache")]
    assert main(argv) == 0
    raw["distillation"]["teacher_cache"] = str(tmp / "cache")
    return raw


def _cache_trainer(
    raw: dict, tokenizer_dir, out: Path, rows=None, seen=None, distillation=None, **args
) -> DistillationTrainer:
    """A student trained from ``raw``'s cache (``distillation``: default ``raw``'s section); ``seen``
    collects the block ids of every batch collated."""
    tok = load_tokenizer(str(tokenizer_dir))
    data = prepare_distillation_data(raw["data"], tok, seed=raw["training"]["seed"])
    collate = data.collator
    if seen is not None:

        def collate(features):
            batch = data.collator(features)
            seen.append(batch["sample_ids"].tolist())
            return batch

    return DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=raw["training"]["seed"]),
        _args(out, **args),
        teacher=None,
        distillation=distillation or raw["distillation"],
        train_dataset=data.train if rows is None else rows,
        eval_dataset=data.eval,
        data_collator=collate,
        processing_class=tok,
    )


def test_trainer_from_a_teacher_cache_repeats_sakd_distill(cached, make_distiller, tokenizer_dir, tmp_path):
    """The same blocks in the same order: every step's loss and kd, and the final weights, are sakd
    distill's from the same cache (top-16 stored ids, topk_tail)."""
    d = make_distiller(cached, max_steps=3, batch_size=4, output_dir=str(tmp_path / "distill"))
    order = [i for s in range(3) for mb in d.plan.micro_batches(0, s, 0) for i in mb]
    d.train()
    metrics = [json.loads(x) for x in (d.run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = [m for m in metrics if "loss" in m]
    rows = d.data.train.select(order).add_column("sample_id", order)
    trainer = _cache_trainer(cached, tokenizer_dir, tmp_path / "hf", rows=rows)
    assert trainer.teacher is None and trainer.distillation.loss.sparse == "topk_tail"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("loss", "kd", "ce"):
        assert [h[key] for h in logs] == pytest.approx([m[key] for m in ref], rel=1e-5), key
    want = d.hf_student.state_dict()
    for k, v in trainer.student.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)


def test_trainer_from_a_teacher_cache_resumes_exactly(cached, tokenizer_dir, tmp_path):
    """The Trainer's random sampler, 6 steps of 4 blocks (16 blocks: the second epoch starts at step 5);
    3 steps + resume_from_checkpoint + 3 steps reads the uninterrupted run's block ids at steps 4-6, logs
    its losses and ends with bit-identical weights. Evaluation (held-out blocks, not in the cache) is the
    student's CE."""
    minimal = {"teacher_cache": cached["distillation"]["teacher_cache"], "loss": {"temperature": 2.0}}
    args = {"train_sampling_strategy": "random", "max_steps": 6, "distillation": minimal}  # README's form
    ids: dict[str, list] = {"full": [], "resumed": []}
    full = _cache_trainer(cached, tokenizer_dir, tmp_path / "full", seen=ids["full"], **args)
    full.train()
    del ids["full"][6:]  # the data loader collates one batch ahead
    assert len(ids["full"]) == 6 and sorted(sum(ids["full"][:4], [])) == list(range(BLOCKS))
    assert ids["full"][:4] != [list(range(i, i + 4)) for i in range(0, BLOCKS, 4)]  # a shuffled order
    out = tmp_path / "resumed"
    _cache_trainer(cached, tokenizer_dir, out, save_strategy="steps", save_steps=3, **args).train()
    resumed = _cache_trainer(cached, tokenizer_dir, out, seen=ids["resumed"], **args)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert ids["resumed"][:3] == ids["full"][3:]
    logs = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    again = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3}
    assert again == {s: v for s, v in logs.items() if s > 3}
    for k, v in resumed.student.state_dict().items():
        assert torch.equal(v, full.student.state_dict()[k]), k
    assert 0 < full.evaluate()["eval_loss"] < 20


def test_a_cache_the_rows_do_not_match_is_refused(cached, tokenizer_dir, tmp_path):
    """One line each: rows without block ids, rows of another split than the cache's, a teacher besides."""
    from sakd.config import ConfigError
    from sakd.errors import DataError

    tok = load_tokenizer(str(tokenizer_dir))
    data = prepare_distillation_data(cached["data"], tok, seed=0)
    with pytest.raises(ConfigError, match="need a 'sample_id' column"):
        _cache_trainer(cached, tokenizer_dir, tmp_path, rows=data.train.remove_columns("sample_id"))
    other = prepare_distillation_data(cached["data"], tok, seed=1)  # another held-out split: other blocks
    with pytest.raises(DataError, match="holds other tokens than teacher cache"):
        _cache_trainer(cached, tokenizer_dir, tmp_path, rows=other.train)
    with pytest.raises(ConfigError, match="replaces the teacher"):
        DistillationTrainer(
            load_model("tiny-dense", tokenizer=tok, seed=0),
            _args(tmp_path),
            teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
            distillation=cached["distillation"],
            train_dataset=data.train,
            data_collator=data.collator,
            processing_class=tok,
        )


def test_knowledge_augmentation_refuses_batches_without_block_ids(tokenizer_dir, corpus, tmp_path):
    from sakd.config import ConfigError

    tok = load_tokenizer(str(tokenizer_dir))
    data = prepare_distillation_data({"train": str(corpus), "block_size": 32, "max_eval_blocks": 8}, tok)
    trainer = DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        _args(tmp_path, max_steps=1),
        teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
        distillation={"moe": {"augment_samples": 2}},
        train_dataset=data.train.remove_columns("sample_id"),
        data_collator=data.collator,
        processing_class=tok,
    )
    with pytest.raises(
        ConfigError, match=r"Knowledge Augmentation reads each batch's block ids \(sample_ids\)"
    ):
        trainer.train()
