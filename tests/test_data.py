import json

import pytest
import torch

from sakd.config import DataConfig
from sakd.data import BatchPlan, DataError, load_text_dataset, pack, prepare_data
from sakd.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def test_formats_give_the_same_text(tmp_path, corpus):
    lines = [ln for ln in corpus.read_text().splitlines() if ln.strip()][:50]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in lines))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": lines}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("\n".join(lines[:25]) + "\n\n\n" + "\n".join(lines[25:]) + "\n")
    txt = load_text_dataset(str(tmp_path / "d.txt"))["text"]
    js = load_text_dataset(str(tmp_path / "d.jsonl"), text_field="body")["text"]
    pa_ = load_text_dataset(str(tmp_path / "d.parquet"))["text"]
    assert txt == js == pa_ == lines  # blank lines dropped


def test_packing_is_exact(tok, corpus):
    docs = load_text_dataset(str(corpus)).select(range(30))
    blocks = pack(docs, tok, 16)
    stream = []
    for t in docs["text"]:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = [i for b in blocks["input_ids"] for i in b]
    assert all(len(b) == 16 for b in blocks["input_ids"])
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 16


def test_split_is_by_document_and_deterministic(tok, corpus):
    cfg = DataConfig(train=str(corpus), block_size=32, eval_fraction=0.1, max_eval_blocks=None)
    a, b = prepare_data(cfg, tok, seed=1), prepare_data(cfg, tok, seed=1)
    assert torch.equal(a.train[:]["input_ids"], b.train[:]["input_ids"])
    assert len(a.eval) > 0 and len(a.train) > 5 * len(a.eval)
    train_rows = {tuple(r.tolist()) for r in a.train[:]["input_ids"]}
    assert not any(tuple(r.tolist()) in train_rows for r in a.eval[:]["input_ids"])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "data file not found"),
        (lambda p: p.write_text(""), "data file is empty"),
        (lambda p: p.write_text("one short line\nanother\n"), "shorter than one block"),
        (lambda p: p.write_text("\n\n  \n"), "no non-empty documents"),
    ],
)
def test_bad_corpora(tmp_path, tok, setup, message):
    path = tmp_path / "c.txt"
    setup(path)
    with pytest.raises(DataError, match=message):
        prepare_data(DataConfig(train=str(path), block_size=64), tok, seed=0)


def test_unsupported_file_type(tmp_path, tok):
    path = tmp_path / "c.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_text_dataset(str(path))


def test_batch_plan_is_split_invariant():
    """The blocks of one optimizer step do not depend on micro-batch x accumulation x ranks."""

    def step_blocks(micro, accum, world, step):
        plan = BatchPlan(num_blocks=100, micro_batch=micro, accumulation=accum, world_size=world, seed=5)
        return sorted(i for r in range(world) for mb in plan.micro_batches(0, step, r) for i in mb)

    for step in range(3):
        ref = step_blocks(8, 1, 1, step)
        assert len(set(ref)) == 8
        assert step_blocks(1, 8, 1, step) == ref == step_blocks(4, 2, 1, step) == step_blocks(2, 2, 2, step)
    plan = BatchPlan(num_blocks=100, micro_batch=4, accumulation=2, world_size=2, seed=5)
    r0 = {i for mb in plan.micro_batches(0, 0, 0) for i in mb}
    r1 = {i for mb in plan.micro_batches(0, 0, 1) for i in mb}
    assert not r0 & r1  # ranks read different blocks
    assert plan.epoch_order(0).tolist() != plan.epoch_order(1).tolist()
    assert plan.steps_per_epoch == 100 // 16
