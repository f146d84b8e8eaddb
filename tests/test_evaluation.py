"""How held-out text is scored: the window plans, strided vs blocked, bits per byte by hand, the packing
EOS left unscored, against plain `transformers` loss computations."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sakd.data import TokenStream, load_text_dataset, pack, text_stream
from sakd.evaluation.heldout import evaluate
from sakd.evaluation.windows import plan_windows
from sakd.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def _tiny_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(
    "n, window, stride", [(100, 32, 16), (97, 32, 7), (64, 32, None), (65, 32, 32), (5, 32, 8)]
)
def test_window_plans_score_each_token_once(n, window, stride):
    windows = plan_windows(n, window, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.begin <= window and w.begin < w.first <= w.end for w in windows)
    if stride is None or stride == window:  # blocked: every token but each block's first
        assert scored == [t for t in range(n) if t % window and t < n]
    else:  # strided: every token after the first, with >= window - stride tokens of context after window 1
        assert scored == list(range(1, n))
        assert all(w.first - w.begin >= window - stride for w in windows[1:])
    assert plan_windows(n, window, window) == plan_windows(n, window)


def _plain_nll(model, ids: torch.Tensor, windows, scored: torch.Tensor) -> tuple[float, int, list[int]]:
    """The HF perplexity guide's loop with exact counting: labels -100 except the window's targets, the
    model's own (mean) loss times the number of targets it averaged."""
    nll, count, positions = 0.0, 0, []
    for w in windows:
        x = ids[w.begin : w.end].unsqueeze(0)
        labels = x.clone()
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[0, w.first - w.begin :] = True
        keep &= scored[w.begin : w.end].unsqueeze(0)
        labels[~keep] = -100
        n = int(keep[:, 1:].sum())
        if n:
            with torch.no_grad():
                nll += float(model(x, labels=labels).loss.double()) * n
            count += n
            positions += [w.begin + i for i in range(w.end - w.begin) if keep[0, i]]
    return nll, count, positions


@pytest.mark.parametrize("stride", [None, 8])
def test_evaluate_matches_plain_transformers_and_bits_per_byte_by_hand(tok, stride):
    texts = ["Déjà vu: the café in Zürich — 12 rooms.\nSecond line here.", "Another document, plain ASCII."]
    stream = text_stream(datasets.Dataset.from_dict({"text": texts}), tok)
    model = _tiny_llama(len(tok))
    got = evaluate(model, stream, batch_size=3, window=16, stride=stride)

    windows = plan_windows(len(stream), 16, stride)
    nll, count, positions = _plain_nll(model, stream.ids, windows, stream.ids != tok.eos_token_id)
    assert got["tokens"] == count and got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["method"] == ("blocked" if stride is None else "strided")
    # bytes by hand: the scored tokens' text, from each token's own encoding of its document
    by_token = []
    for text in texts:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        prev = 0
        for i, (_, e) in enumerate(enc["offset_mapping"]):
            e = len(text) if i == len(enc["offset_mapping"]) - 1 else max(prev, e)
            by_token.append(len(text[prev:e].encode()))
            prev = e
        by_token.append(0)  # the EOS
    assert sum(by_token) == sum(len(t.encode()) for t in texts)
    scored_bytes = sum(by_token[p] for p in positions)
    assert got["bytes"] == scored_bytes
    assert got["bpb"] == pytest.approx(nll / scored_bytes / math.log(2), rel=1e-5)
    if stride is not None:  # strided scores all text but the first token
        assert scored_bytes == sum(by_token) - by_token[0]


def test_the_packing_eos_is_never_scored(tok):
    stream = text_stream(datasets.Dataset.from_dict({"text": ["one two", "three four", "five"]}), tok)
    eos = int((stream.ids == tok.eos_token_id).sum())
    assert eos == 3
    model = _tiny_llama(len(tok))
    got = evaluate(model, stream, batch_size=2, window=len(stream))  # one window: all but token 0
    assert got["tokens"] == len(stream) - 1 - eos
    everything = TokenStream(stream.ids, stream.nbytes, eos_id=None)
    assert evaluate(model, everything, batch_size=2, window=len(stream))["tokens"] == len(stream) - 1


def test_stride_equal_to_block_is_the_blocked_evaluation_of_packed_blocks(tok, corpus):
    docs = load_text_dataset(str(corpus), sample_by="line").select(range(60))
    blocks = pack(docs, tok, 32, with_bytes=True).with_format("torch")
    model = _tiny_llama(len(tok))
    blocked = evaluate(model, blocks, batch_size=4, eos_id=tok.eos_token_id)
    strided = evaluate(model, blocks, batch_size=5, stride=32, eos_id=tok.eos_token_id)
    assert blocked["method"] == strided["method"] == "blocked"
    assert blocked["tokens"] == strided["tokens"] and blocked["bytes"] == strided["bytes"]
    assert blocked["loss"] == pytest.approx(strided["loss"], rel=1e-6)
    # the same blocks scored one by one with the model's own loss (EOS targets masked)
    nll = n = 0
    for row in blocks[:]["input_ids"]:
        labels = row.clone().unsqueeze(0)
        labels[labels == tok.eos_token_id] = -100
        k = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll += float(model(row.unsqueeze(0), labels=labels).loss) * k
        n += k
    assert blocked["tokens"] == n and blocked["loss"] == pytest.approx(nll / n, rel=1e-5)


def test_strided_loss_of_a_trained_model_is_at_most_its_blocked_loss(tok, corpus):
    """More context cannot hurt a model that learned to use it: a tiny model trained briefly on the
    corpus, scored on one long held-out document."""
    lines = [ln for ln in corpus.read_text().splitlines() if ln.strip()]
    train_ids = torch.tensor(tok("\n".join(lines[:300]), add_special_tokens=False)["input_ids"])
    model = _tiny_llama(len(tok), seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, len(train_ids) - 65, (8,), generator=g)
        x = torch.stack([train_ids[s : s + 64] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    held = text_stream(datasets.Dataset.from_dict({"text": ["\n".join(lines[300:360])]}), tok)
    blocked = evaluate(model, held, batch_size=8, window=16)  # token k of a block sees k tokens
    strided = evaluate(model, held, batch_size=8, window=16, stride=4)  # every token sees >= 12
    assert strided["tokens"] > blocked["tokens"]
    assert strided["loss"] < blocked["loss"] and strided["bpb"] < blocked["bpb"]


@pytest.mark.integration
@pytest.mark.parametrize("stride", [None, 8])
def test_the_run_summary_states_bits_per_byte_and_the_method(make_distiller, tiny_run_config, stride):
    import copy

    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"]["alpha"] = 0.0  # no teacher needed
    raw["data"]["eval_stride"] = stride
    d = make_distiller(raw, max_steps=1)
    summary = d.train()
    assert summary["eval_method"] == ("blocked" if stride is None else "strided")
    assert summary["eval_bytes"] > summary["eval_tokens"] > 0
    expected = summary["eval_loss"] * summary["eval_tokens"] / summary["eval_bytes"] / math.log(2)
    assert summary["eval_bpb"] == pytest.approx(expected)
    n = 8 * 32  # max_eval_blocks x block_size, every target but each block's first (or the first) and EOS
    assert summary["eval_tokens"] < (n - 8 if stride is None else n - 1)


def test_a_stride_longer_than_the_block_is_refused(tiny_run_config):
    from sakd.config import load_config
    from sakd.errors import ConfigError

    with pytest.raises(ConfigError, match="data.eval_stride=64 is larger than data.block_size=32"):
        load_config(tiny_run_config, ["data.eval_stride=64"])
    with pytest.raises(ConfigError, match="sample_by"):
        load_config(tiny_run_config, ["data.sample_by=sentence"])
