"""Review of issue 24's chat path: `sakd eval --format chat --max-blocks N` counts the conversations it
scored, and a block boundary inside a run of template tokens (two templates) keeps the teacher's role
header with the content it introduces."""

from __future__ import annotations

import json
import re

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sakd.cli import main
from sakd.commands.demo import train_tokenizer
from sakd.data import pack_pair
from sakd.data.chat import encode_conversation
from sakd.data.chat_pair import tokenize_conversation_pairs

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OTHER = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONVERSATIONS = [
    [
        {"role": "user", "content": "Where does Bob live?"},
        {"role": "assistant", "content": "Bob lives in Stanford ."},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "they eat bread and cheese ."},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "the river runs to the sea"},
    ],
]


def _with_template(base, tokens, template, out):
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens(tokens, special_tokens=True)
    tok.chat_template = template
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def chat_tok(tokenizer_dir, tmp_path_factory):
    return _with_template(tokenizer_dir, ["<|im_start|>", "<|im_end|>"], CHATML, tmp_path_factory.mktemp("s"))


def test_eval_max_blocks_counts_the_conversations_it_scored(chat_tok, tmp_path, capsys):
    """`documents` is the number of conversations with a scored token in the first N blocks, counted here
    from each conversation's own target flags (it reported every conversation of the file)."""
    convs = CONVERSATIONS * 6
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(chat_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    chat_tok.save_pretrained(tmp_path / "model")
    for blocks, block_size in ((1, 32), (2, 40), (3, 16)):
        args = ["--format", "chat", "--block-size", str(block_size), "--max-blocks", str(blocks)]
        capsys.readouterr()
        assert main(["eval", str(tmp_path / "model"), "--data", str(data), *args]) == 0
        result = json.loads(capsys.readouterr().out)
        n, start, expected = blocks * block_size, 0, 0
        for m in convs:
            target = encode_conversation(chat_tok, m, "assistant")["target"]
            inside = target[: max(n - start, 0)]
            expected += bool(inside[1:].any())  # a conversation's first token is never scored
            start += len(target)
        assert 0 < expected < len(convs)
        assert result["documents"] == expected


def test_a_block_boundary_inside_a_template_run_keeps_the_teachers_header_with_its_content(
    chat_tok, corpus, tmp_path
):
    """Student template tokens all share the content coordinate of the gap they sit in; when a block
    boundary falls between two of them, the teacher's template tokens of that gap (its role header among
    them) go with the later block, which holds the content they introduce -- they went to the earlier one,
    so the teacher read the assistant's answer without its header. Checked on every such boundary of
    several block sizes, from the teacher's own rendering."""
    base = train_tokenizer(corpus, tmp_path / "tbase", 300)
    teacher_tok = _with_template(
        base, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], OTHER, tmp_path / "t"
    )
    convs = CONVERSATIONS * 4
    rows = tokenize_conversation_pairs(datasets.Dataset.from_dict({"messages": convs}), chat_tok, teacher_tok)
    s_ends = np.concatenate([np.asarray(r) + i * 100_000 for i, r in enumerate(rows["ends"])])
    t_ends_all = np.concatenate([np.asarray(r) + i * 100_000 for i, r in enumerate(rows["teacher_ends"])])
    t_ids_all = np.concatenate([np.asarray(r) for r in rows["teacher_input_ids"]])
    checked = headers = 0
    for block_size in range(9, 30):
        blocks = pack_pair(None, chat_tok, teacher_tok, block_size, rows=rows)
        t_off = 0
        for k, row in enumerate(blocks):
            n_t = int(row["teacher_length"])
            a = k * block_size
            if k > 0 and s_ends[a - 1] == s_ends[a]:  # the boundary splits a run of student template tokens
                run = np.flatnonzero(t_ends_all == s_ends[a])  # the teacher's template tokens of that gap
                assert run.size and (run >= t_off).all() and (run < t_off + n_t).all(), (block_size, k)
                header = teacher_tok.decode(t_ids_all[run])
                headers += re.search(r"<\|(system|user|assistant)\|>\n$", header) is not None
                checked += 1
            t_off += n_t
    assert checked > 5 and headers > 5
