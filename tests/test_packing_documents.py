"""data.packing=within_document: a packed block gives each document the per-token losses it gets alone.

The reference runs every document piece of a block by itself (its own forward, positions from 0, no mask);
the packed block runs once with the document mask (sakd.data.documents). Student CE and the KD term per
token must agree, for the Llama student and the Qwen3-MoE teacher, under sdpa and eager attention."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from sakd.config import LossConfig, load_config
from sakd.data import make_batch, pack, prepare_data
from sakd.data.documents import document_mask, document_positions
from sakd.models.forward import hidden_and_head
from sakd.models.loading import load_model
from sakd.objective.composite import Objective

# fp32 on CPU: the packed and the one-by-one forwards sum attention over different key sets (masked keys
# add exact zeros), so they differ only by float rounding; measured ~1e-6, bounded here at 2e-5 nats
ATOL = 2e-5


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def blocks(tok):
    # documents of 3 to ~40 tokens: blocks of 32 hold several, and some documents span two blocks
    words = "the quick brown fox lives in a city and eats bread with friends".split()
    docs = [" ".join(words[(i * 3) % 7 : (i * 3) % 7 + 1 + (i * 5) % 12]) * (1 + i % 3) for i in range(40)]
    rows = pack(datasets.Dataset.from_dict({"text": docs}), tok, 32, with_positions=True)
    return rows.with_format("torch")[:6]


def _models(tok, attn):
    student = load_model("tiny-dense", tokenizer=tok, seed=0, attn_implementation=attn).eval()
    teacher = load_model("tiny-moe", tokenizer=tok, seed=1, attn_implementation=attn).eval()
    return student, teacher


def _logits(model, ids, mask=None):
    out = hidden_and_head(model, model, ids, mask)
    return out.hidden @ out.head_weight.T


def _per_token(s_logits, t_logits, ids, T=2.0):
    """Per-position CE of the next token and KL(teacher || student) at temperature T."""
    ce = F.cross_entropy(s_logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    kl = F.kl_div(
        F.log_softmax(s_logits[:, :-1] / T, -1),
        F.log_softmax(t_logits[:, :-1] / T, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    return ce, kl


def _pieces(mask):
    """(row, start, end) of every document piece of a document mask."""
    out = []
    for r, row in enumerate(mask.tolist()):
        start = 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[i - 1]:
                out.append((r, start, i))
                start = i
    return out


def test_document_mask_and_positions_round_trip():
    pos = torch.tensor([[5, 6, 0, 1, 2, 0, 0, 1]])
    mask = document_mask(pos)
    assert mask.tolist() == [[1, 1, 2, 2, 2, 3, 4, 4]]
    assert document_positions(mask).tolist() == [[0, 1, 0, 1, 2, 0, 0, 1]]
    padded = torch.tensor([[1, 1, 2, 0, 0]])
    assert document_positions(padded).tolist() == [[0, 1, 0, 0, 1]]
    with pytest.raises(ValueError, match="right-padded"):
        document_positions(torch.tensor([[0, 1, 1]]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_block_matches_documents_run_one_by_one(tok, blocks, attn):
    student, teacher = _models(tok, attn)
    batch = make_batch(
        blocks["input_ids"], list(range(6)), eos_id=tok.eos_token_id, positions=blocks["position"]
    )
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pieces = _pieces(mask)
    assert len(pieces) > 2 * len(ids), "the blocks should hold several documents each"
    ce, kl = _per_token(_logits(student, ids, mask), _logits(teacher, ids, mask), ids)
    ce_x, kl_x = _per_token(_logits(student, ids), _logits(teacher, ids), ids)  # cross_document
    scored = crossed = 0
    for r, a, b in pieces:
        if b - a < 2:
            continue
        piece = ids[r : r + 1, a:b]
        ce_1, kl_1 = _per_token(_logits(student, piece), _logits(teacher, piece), piece)
        valid = labels[r, a + 1 : b] != -100
        torch.testing.assert_close(ce[r, a : b - 1][valid], ce_1[0][valid], atol=ATOL, rtol=0)
        torch.testing.assert_close(kl[r, a : b - 1][valid], kl_1[0][valid], atol=ATOL, rtol=0)
        scored += int(valid.sum())
        if a > 0:  # a later document: packing across documents changes what it sees
            crossed += int((ce_x[r, a : b - 1] - ce_1[0]).abs().max() > 1e-3)
    assert scored > 100
    assert crossed > 0, "cross_document packing should differ from the per-document runs"
    # a document's first token is never a target (nothing of its document predicts it)
    starts = blocks["position"] == 0
    starts[:, 0] = False
    assert (labels[starts] == -100).all()


@torch.no_grad()
def test_objective_of_a_packed_block_is_the_sum_over_its_documents(tok, blocks):
    """The composite objective (fused CE + KD, labels' valid mask) of a packed block equals the sum of
    the objectives of its documents run alone."""
    student, teacher = _models(tok, "sdpa")
    batch = make_batch(
        blocks["input_ids"], list(range(6)), eos_id=tok.eos_token_id, positions=blocks["position"]
    )
    obj = Objective(LossConfig(alpha=0.5, temperature=2.0, chunk_size=16), vocab_size=len(tok))
    mask = batch["attention_mask"]
    packed = obj(
        hidden_and_head(student, student, batch["input_ids"], mask),
        hidden_and_head(teacher, teacher, batch["input_ids"], mask),
        batch["labels"],
        temperature=2.0,
        batch=batch,
    )
    total, n = torch.zeros((), dtype=torch.float64), 0
    for r, a, b in _pieces(mask):
        if b - a < 2:  # a one-token piece predicts nothing
            continue
        ids, labels = batch["input_ids"][r : r + 1, a:b], batch["labels"][r : r + 1, a:b]
        out = obj(
            hidden_and_head(student, student, ids),
            hidden_and_head(teacher, teacher, ids),
            labels,
            temperature=2.0,
            batch={"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)},
        )
        total += out.loss_sum.double()
        n += int(out.num_tokens)
    assert int(packed.num_tokens) == n
    torch.testing.assert_close(packed.loss_sum.double(), total, atol=1e-3, rtol=1e-5)


def test_prepare_data_packs_within_documents_by_config(corpus, tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    raw = {
        "data": {"train": str(corpus), "sample_by": "line", "block_size": 128, "packing": "within_document"}
    }
    cfg = load_config(raw)[0].data
    bundle = prepare_data(cfg, tok, seed=0)
    batch = bundle.train_batch([0, 1])
    assert int(batch["attention_mask"].max()) > 1  # several documents in a block
    assert (batch["labels"][batch["input_ids"] == tok.eos_token_id] == -100).all()
    assert bundle.heldout().positions is not None
    cfg_x = load_config({"data": {**raw["data"], "packing": None}})[0].data
    assert cfg_x.resolved_packing() == "cross_document"
    assert int(prepare_data(cfg_x, tok, seed=0).train_batch([0])["attention_mask"].max()) == 1


@torch.no_grad()
def test_teacher_of_another_tokenizer_gets_its_own_document_mask(corpus, tokenizer_dir, tmp_path_factory):
    """Across tokenizers the teacher's tokens of a block carry their own document positions: the teacher's
    hidden states in the packed block equal those of each teacher document piece run alone."""
    from sakd.commands.demo import train_tokenizer
    from sakd.data import pack_pair

    t_tok = AutoTokenizer.from_pretrained(
        str(train_tokenizer(corpus, tmp_path_factory.mktemp("tt") / "t", 300))
    )
    s_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    docs = datasets.Dataset.from_dict({"text": corpus.read_text().splitlines()[:30]})
    rows = pack_pair(docs, s_tok, t_tok, 128, with_positions=True)
    from sakd.data.bundle import DataBundle

    bundle = DataBundle(rows, rows, 128, teacher_block_size=max(rows["teacher_length"]), teacher_pad_id=0)
    batch = bundle.rows_batch(rows[:3], [0, 1, 2])
    t_mask = batch["teacher_attention_mask"]
    # as many document starts on each side (an EOS ends every document in both tokenizations)
    assert (document_positions(t_mask)[t_mask > 0] == 0).sum() == (
        document_positions(batch["attention_mask"]) == 0
    ).sum()
    teacher = load_model("tiny-moe", tokenizer=t_tok, seed=1).eval()
    packed = hidden_and_head(teacher, teacher, batch["teacher_input_ids"], t_mask).hidden
    for r, a, b in _pieces(t_mask):
        if t_mask[r, a] == 0:
            continue  # padding
        alone = hidden_and_head(teacher, teacher, batch["teacher_input_ids"][r : r + 1, a:b]).hidden[0]
        torch.testing.assert_close(packed[r, a:b], alone, atol=ATOL, rtol=0)
