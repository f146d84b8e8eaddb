"""On-policy, mixed and sequence-level distillation over conversations (data.format=chat, sakd/policy/chat):
the student answers the conversation cut at its last user turn (its own template, generation prompt), the
teacher scores the answer under its own template; only the answer's tokens (and the end-of-turn token the
student emitted) carry loss. Checked against renderings done here with plain apply_chat_template and
tokenizer.decode, not through sakd's spans."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from sakd.commands.demo import train_tokenizer
from sakd.policy.batches import IGNORE_INDEX
from sakd.policy.chat import prompt_messages

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# the teacher's template: other markers and a distinctive default system prompt
OTHER = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|system|>\nYou are a careful teacher.<|end|>\n{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MARKER = "You are a careful teacher."

CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Where does Bob live?"},
        {"role": "assistant", "content": "Bob lives in Stanford ."},
    ],
    [
        {"role": "user", "content": "Who meets a friend?"},
        {"role": "assistant", "content": "the assistant meets a friend"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "they eat bread — und Käse ."},
    ],
    [
        {"role": "user", "content": "say something about the river"},
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
def student_tok(tokenizer_dir, tmp_path_factory):
    return _with_template(
        tokenizer_dir, ["<|im_start|>", "<|im_end|>"], CHATML, tmp_path_factory.mktemp("s") / "tok"
    )


@pytest.fixture(scope="module")
def teacher_toks(corpus, tokenizer_dir, tmp_path_factory):
    """``other``: another vocabulary and the OTHER template; ``marked``: the student's vocabulary (its
    ChatML tokens included) with the OTHER template -- one vocabulary, two renderings."""
    base = train_tokenizer(corpus, tmp_path_factory.mktemp("tbase") / "tok", 300)
    markers = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    other = _with_template(base, markers, OTHER, tmp_path_factory.mktemp("t") / "tok")
    marked = _with_template(
        tokenizer_dir, ["<|im_start|>", "<|im_end|>", *markers], OTHER, tmp_path_factory.mktemp("m") / "tok"
    )
    return {"other": other, "marked": marked}


def _recipe(tiny_run_config, tmp_path, student_tok, teacher_tok, policy, **generation):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 8))
    raw = copy.deepcopy(tiny_run_config)
    raw["data"] = {"train": str(data), "format": "chat", "block_size": 96, "max_eval_blocks": 4}
    raw["model"]["tokenizer"] = str(student_tok.name_or_path)
    if teacher_tok is not None:
        raw["model"]["teacher_tokenizer"] = str(teacher_tok.name_or_path)
    raw["distillation"]["policy"] = policy
    raw["distillation"]["generation"] = {"prompt_tokens": 64, "max_new_tokens": 8, **generation}
    raw["training"].update(max_steps=3, batch_size=2)
    return raw


def _prompt_text(tok, row_messages):
    return tok.apply_chat_template(prompt_messages(row_messages), add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("policy", ["on", "mixed", "sequence"])
@pytest.mark.parametrize("teacher", ["same", "other"])
def test_chat_runs_train_with_every_policy(
    tiny_run_config, make_distiller, student_tok, teacher_toks, tmp_path, policy, teacher
):
    """A few steps of each policy, one tokenizer and across tokenizers: finite losses, on-policy steps taken,
    and the end-of-run evaluation of the student's answers (cont_*) under the teacher's template."""
    t_tok = None if teacher == "same" else teacher_toks[teacher]
    gen = {"fraction": 0.5, "eval_prompts": 3} if policy == "mixed" else {"eval_prompts": 3}
    if policy == "sequence":
        gen["sequence_loss"] = "kd"
    raw = _recipe(tiny_run_config, tmp_path, student_tok, t_tok, policy, **gen)
    make_distiller(raw).train()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "policy_step" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert any(r["policy_step"] == 1 for r in steps)
    if policy == "mixed":
        assert any(r["policy_step"] == 0 for r in steps)  # the dataset's own assistant turns
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cont = json.dumps(summary)
    assert "student_continuations" in cont and "teacher_bpb" in cont
