import bisect
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
    txt = load_text_dataset(str(tmp_path / "d.txt"), sample_by="line")["text"]
    js = load_text_dataset(str(tmp_path / "d.jsonl"), text_field="body")["text"]
    pa_ = load_text_dataset(str(tmp_path / "d.parquet"))["text"]
    assert txt == js == pa_ == lines  # blank lines dropped


def test_packing_is_exact(tok, corpus):
    docs = load_text_dataset(str(corpus), sample_by="line").select(range(30))
    blocks = pack(docs, tok, 16)
    stream = []
    for t in docs["text"]:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = [i for b in blocks["input_ids"] for i in b]
    assert all(len(b) == 16 for b in blocks["input_ids"])
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 16


def test_split_is_by_document_and_deterministic(tok, corpus):
    cfg = DataConfig(
        train=str(corpus), sample_by="line", block_size=32, eval_fraction=0.1, max_eval_blocks=None
    )
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


PROSE = (
    "It was the best of times,\nit was the worst of times.\n\n"
    "Naïve café owners — 日本 — paid 12 francs.\n\n\n"
    "A third paragraph\nwrapped over\nthree lines.\n"
)


@pytest.mark.parametrize(
    "sample_by, expected",
    [
        ("line", [ln for ln in PROSE.splitlines() if ln.strip()]),
        ("paragraph", [p for p in PROSE.split("\n\n") if p.strip()]),
        ("document", [PROSE]),
    ],
)
def test_sample_by_gives_the_documents_and_keeps_line_breaks(tmp_path, sample_by, expected):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE, encoding="utf-8")
    docs = load_text_dataset(str(path), sample_by=sample_by)["text"]
    assert list(docs) == expected
    assert len(docs) == {"line": 6, "paragraph": 3, "document": 1}[sample_by]
    if sample_by != "line":
        assert "times,\nit was" in docs[0]  # the line break inside a document is text


def test_line_breaks_survive_tokenization_and_eos_only_ends_documents(tmp_path, tok):
    from sakd.data import tokenize_documents

    path = tmp_path / "prose.txt"
    path.write_text(PROSE, encoding="utf-8")
    docs = load_text_dataset(str(path), sample_by="paragraph")
    rows = tokenize_documents(docs, tok, with_bytes=True)
    for text, ids, nbytes in zip(docs["text"], rows["input_ids"], rows["byte_counts"], strict=True):
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]  # EOS: the document's end
        assert tok.decode(ids[:-1]) == text  # line breaks included (paragraphs 1 and 3 hold some)
        assert sum(nbytes) == len(text.encode("utf-8")) and nbytes[-1] == 0  # EOS covers no text
    assert "\n" in tok.decode(rows[0]["input_ids"]) and "\n" in tok.decode(rows[2]["input_ids"])


def test_byte_counts_by_hand(tok):
    """Every token's bytes are the UTF-8 bytes of the text it adds; a multi-byte character cut into
    byte pieces counts once, on its last piece's predecessor-to-end span."""
    import datasets

    from sakd.data import tokenize_documents

    texts = ["plain ascii text", "é日本 x"]
    rows = tokenize_documents(datasets.Dataset.from_dict({"text": texts}), tok, with_bytes=True)
    ascii_ids, ascii_bytes = rows[0]["input_ids"][:-1], rows[0]["byte_counts"][:-1]
    assert ascii_bytes == [len(tok.decode([i]).encode()) for i in ascii_ids]  # ASCII: each token's own text
    enc = tok(texts[1], add_special_tokens=False, return_offsets_mapping=True)
    ends, by_hand, prev = [e for _, e in enc["offset_mapping"]], [], 0
    for e in ends[:-1] + [len(texts[1])]:
        by_hand.append(len(texts[1][prev:e].encode()))
        prev = max(prev, e)
    assert rows[1]["byte_counts"][:-1] == by_hand and sum(by_hand) == len(texts[1].encode()) == 10


def test_sample_by_refuses_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(DataError, match="applies to .txt files"):
        load_text_dataset(str(path), sample_by="line")


def _many_docs(corpus, n):
    lines = [ln for ln in corpus.read_text().splitlines() if ln.strip()]
    return [f"{lines[i % len(lines)]} ({i})" for i in range(n)]


def test_packing_keeps_every_token_across_map_batches(tok, corpus):
    """Blocks are consecutive stretches of ONE stream: nothing is dropped at the old 2,000-document map
    batch boundaries, only the stream's last < block_size tokens."""
    import datasets

    texts = _many_docs(corpus, 4500)
    blocks = pack(datasets.Dataset.from_dict({"text": texts}), tok, 64)
    stream = []
    for seq in tok(texts, add_special_tokens=False)["input_ids"]:
        stream += seq + [tok.eos_token_id]
    assert len(blocks) == len(stream) // 64
    flat = [i for b in blocks["input_ids"] for i in b]
    assert flat == stream[: len(flat)]


def _reference_pair_blocks(texts, tok, ttok, block_size):
    """The paired packing done on the whole corpus at once, by hand (global character spans, EOS one
    virtual character after each document, teacher tokens by end offset, align_spans)."""
    from sakd.align.positions import align_spans

    def stream(t):
        ids, spans, base = [], [], 0
        enc = t(texts, add_special_tokens=False, return_offsets_mapping=True)
        for text, seq, offs in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
            ids += seq
            spans += [(base + a, base + b) for a, b in offs]
            base += len(text)
            ids.append(t.eos_token_id)
            spans.append((base, base + 1))
            base += 1
        return ids, spans

    s_ids, s_spans = stream(tok)
    t_ids, t_spans = stream(ttok)
    t_ends = [b for _, b in t_spans]  # non-decreasing for this tokenizer and text
    assert t_ends == sorted(t_ends)
    out, lo = [], 0
    for k in range(len(s_ids) // block_size):
        blk = slice(k * block_size, (k + 1) * block_size)
        hi = max(b for _, b in s_spans[blk])
        inside = slice(bisect.bisect_right(t_ends, lo), bisect.bisect_right(t_ends, hi))  # lo < end <= hi
        al = align_spans(s_spans[blk], t_spans[inside])
        out.append((s_ids[blk], t_ids[inside], al.anchor.tolist(), al.span_end.tolist()))
        lo = hi
    return out


def test_pair_packing_matches_the_whole_stream_reference(tok, corpus, tmp_path):
    import datasets

    from sakd.commands.demo import train_tokenizer
    from sakd.data import pack_pair

    ttok = load_tokenizer(str(train_tokenizer(corpus, tmp_path / "t", 500)))
    texts = _many_docs(corpus, 2300)  # more than one old map batch of 2,000 documents
    blocks = pack_pair(
        datasets.Dataset.from_dict({"text": texts}), tok, ttok, 48, with_bytes=True, num_proc=2
    )
    ref = _reference_pair_blocks(texts, tok, ttok, 48)
    assert len(blocks) == len(ref)
    got = blocks[:]
    for k in (0, 1, len(ref) // 2, len(ref) - 2, len(ref) - 1, *range(1995, 2005)):
        row = (got["input_ids"][k], got["teacher_input_ids"][k], got["anchor"][k], got["span_end"][k])
        assert row == ref[k], k
    assert [len(t) for t in got["teacher_input_ids"]] == got["teacher_length"]


def test_one_document_is_split_by_characters(tmp_path, tok):
    from sakd.data import split_documents

    text = "".join(f"Line {i} of a long single document.\n" for i in range(200))
    path = tmp_path / "book.txt"
    path.write_text(text)
    train, held = split_documents(DataConfig(train=str(path), eval_fraction=0.1), seed=0)
    assert len(train) == len(held) == 1
    head, tail = train[0]["text"], held[0]["text"]
    assert head + tail == text and head[-1].isspace() and 0.09 < len(tail) / len(text) < 0.11


def test_make_batch_never_targets_the_packing_eos(tok, corpus):
    from sakd.data import make_batch

    docs = load_text_dataset(str(corpus), sample_by="line").select(range(20))
    blocks = pack(docs, tok, 32).with_format("torch")
    batch = make_batch(blocks[:4]["input_ids"], [0, 1, 2, 3], eos_id=tok.eos_token_id)
    is_eos = batch["input_ids"] == tok.eos_token_id
    assert is_eos.any() and bool((batch["labels"][is_eos] == -100).all())
    assert torch.equal(batch["labels"][~is_eos], batch["input_ids"][~is_eos])
