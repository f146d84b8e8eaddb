"""On-policy, mixed and sequence-level distillation over conversations (data.format=chat, sakd/policy/chat_answers):
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


def _stops(tok):
    return {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}


def _rows(batch):
    """Each row's real tokens, labels and (across renderings) the teacher's tokens and anchors."""
    for i in range(batch["input_ids"].shape[0]):
        n = int((batch["attention_mask"][i] > 0).sum())
        row = {"ids": batch["input_ids"][i, :n].tolist(), "labels": batch["labels"][i, :n].tolist()}
        if "teacher_input_ids" in batch:
            m = int(batch["teacher_attention_mask"][i].sum())
            row.update(
                teacher=batch["teacher_input_ids"][i, :m].tolist(), anchor=batch["anchor"][i, :n].tolist()
            )
        yield int(batch["sample_ids"][i]), row


def _student_answer(tok, prefix, ids):
    """(prompt length, answer text, ended) of a row the student wrote, by plain apply_chat_template."""
    prompt_text = tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt  # the prompt: the conversation up to its last user turn, own template
    answer = ids[len(prompt) :]
    ended = bool(answer) and answer[-1] in _stops(tok)
    return len(prompt), tok.decode(answer[:-1] if ended else answer), ended


def _with_written_answers(d, rollout, tok):
    """The rollout's micro-batches plus one whose answers are written here: one closed by <|im_end|>, one
    cut by max_new_tokens, one empty and closed (a random student rarely ends its turn)."""
    answers = ["Bob lives in Stanford .", "they eat bread — und Käse", ""]
    completions = [
        tok(a, add_special_tokens=False)["input_ids"]
        + ([] if i == 1 else [tok.convert_tokens_to_ids("<|im_end|>")])
        for i, a in enumerate(answers)
    ]
    sample_ids = torch.tensor([0, 1, 2])
    prompts = [d.policy.prompts.ids[i] for i in sample_ids.tolist()]
    return [*rollout.micro_batches, d.policy._collate(prompts, completions, sample_ids)]


def _is_prompt_of_a_conversation(prefix):
    assert prefix[-1]["role"] == "user"
    assert any(c[: len(prefix)] == prefix and c[len(prefix)]["role"] == "assistant" for c in CONVERSATIONS)


def test_on_policy_loss_counts_exactly_the_answer_tokens(
    tiny_run_config, make_distiller, student_tok, tmp_path
):
    """One tokenizer, one template: the scored positions are exactly the tokens that rendering the prompt
    plus the answer adds to rendering the prompt (the answer's content, and <|im_end|> when the student
    wrote it), and the step's token count is their number."""
    raw = _recipe(tiny_run_config, tmp_path, student_tok, None, "on", eval_prompts=0, max_new_tokens=12)
    d = make_distiller(raw)
    blocks = d._micro_batches()
    rollout = d.policy.rollout(blocks, d.state.step)
    expected_tokens, ended_rows, counted = 0, 0, len(rollout.micro_batches)
    for k, batch in enumerate(_with_written_answers(d, rollout, student_tok)):
        for sample, row in _rows(batch):
            prefix = d.policy.prompts.prefixes[sample]
            _is_prompt_of_a_conversation(prefix)
            n_prompt, answer, ended = _student_answer(student_tok, prefix, row["ids"])
            prompt_text = student_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
            full = student_tok.apply_chat_template(
                [*prefix, {"role": "assistant", "content": answer}], tokenize=False
            )
            assert full.startswith(prompt_text)
            added = full[len(prompt_text) :]  # what the answer adds: content + "<|im_end|>\n"
            want = added.removesuffix("\n") if ended else added.removesuffix("<|im_end|>\n")
            scored = [p for p, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
            assert scored == list(range(n_prompt, len(row["ids"])))
            assert student_tok.decode([row["ids"][p] for p in scored]) == want
            expected_tokens += len(scored) if k < counted else 0
            ended_rows += ended
    assert ended_rows >= 2
    metrics = d.train_step(blocks)  # the same samples (seeded by seed, step, prompt)
    assert metrics["policy_step"] == 1 and metrics["tokens"] == expected_tokens > 0


@pytest.mark.parametrize("teacher", ["other", "marked"])
def test_the_teacher_reads_its_own_template_and_scores_only_answer_text(
    tiny_run_config, make_distiller, student_tok, teacher_toks, tmp_path, teacher
):
    """Across tokenizers (``other``) and with one vocabulary but another template (``marked``): the
    teacher's input is its own template's rendering of the prompt messages plus the student's answer (its
    marker and default system prompt, none of the student's ChatML), and every scored student position
    predicts an answer token from a position whose teacher anchor has read exactly the same answer text."""
    t_tok = teacher_toks[teacher]
    raw = _recipe(tiny_run_config, tmp_path, student_tok, t_tok, "on", eval_prompts=0, max_new_tokens=12)
    d = make_distiller(raw)
    rollout = d.policy.rollout(d._micro_batches(), 0)
    scored_total, ended_rows = 0, 0
    for batch in _with_written_answers(d, rollout, student_tok):
        for sample, row in _rows(batch):
            prefix = d.policy.prompts.prefixes[sample]
            n_prompt, answer, ended = _student_answer(student_tok, prefix, row["ids"])
            t_head = t_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
            t_full = t_tok.apply_chat_template(
                [*prefix, {"role": "assistant", "content": answer}], tokenize=False
            )
            t_text = t_tok.decode(row["teacher"])
            assert t_text.startswith(t_head) and t_full.startswith(t_text) and "<|assistant|>\n" in t_text
            assert (MARKER in t_text) == (prefix[0]["role"] != "system")
            assert "<|im_start|>" not in t_head
            for p, label in enumerate(row["labels"]):
                if label == IGNORE_INDEX:
                    continue
                assert n_prompt < p < len(row["ids"]) and row["ids"][p] not in _stops(student_tok)
                a = row["anchor"][p - 1]
                assert a >= 0
                read = student_tok.decode(row["ids"][n_prompt:p])
                assert t_tok.decode(row["teacher"][: a + 1]) == t_head + read
                scored_total += 1
            ended_rows += ended
    assert scored_total > 0 and ended_rows >= 2


def test_sequence_mode_trains_on_the_teachers_answer_in_the_students_template(
    tiny_run_config, make_distiller, student_tok, teacher_toks, tmp_path
):
    """policy=sequence across tokenizers: the teacher answers its own template's prompt; the student's row
    is its own template's rendering of the prompt messages plus that answer, and its targets are the answer
    turn (content, and <|im_end|> when the teacher ended its turn)."""
    t_tok = teacher_toks["other"]
    raw = _recipe(
        tiny_run_config, tmp_path, student_tok, t_tok, "sequence", eval_prompts=0, max_new_tokens=12
    )
    d = make_distiller(raw)
    rollout = d.policy.rollout(d._micro_batches(), 0)
    t_stops = {t_tok.eos_token_id, t_tok.convert_tokens_to_ids("<|end|>")}
    for batch in rollout.micro_batches:
        for sample, row in _rows(batch):
            prefix = d.policy.prompts.prefixes[sample]
            t_prompt_text = t_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
            t_prompt = t_tok(t_prompt_text, add_special_tokens=False)["input_ids"]
            assert row["teacher"][: len(t_prompt)] == t_prompt  # the teacher wrote after its own prompt
            written = row["teacher"][len(t_prompt) :]
            ended = bool(written) and written[-1] in t_stops
            answer = t_tok.decode(written[:-1] if ended else written)
            head = student_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
            full = student_tok.apply_chat_template(
                [*prefix, {"role": "assistant", "content": answer}], tokenize=False
            )
            want = answer + ("<|im_end|>" if ended else "")
            assert full.startswith(head + want)
            assert student_tok.decode(row["ids"]) == head + want
            scored = [row["ids"][p] for p, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
            assert student_tok.decode(scored) == want  # (a token straddling head and answer aside)


def test_eval_chat_teacher_scores_the_students_answers_under_its_own_template(
    student_tok, teacher_toks, tmp_path, capsys
):
    """`sakd eval --format chat --teacher`: cont_greedy_* against a computation done here with plain
    transformers -- the student's greedy answer (generate, stopping at <|im_end|>), the teacher's rendering
    of the prompt messages plus that answer, its log-probabilities of the tokens ending inside the answer
    (and its <|end|> when the student ended its turn), per student answer token and per answer byte."""
    from transformers import AutoModelForCausalLM

    from sakd.cli import main
    from sakd.models import load_model

    t_tok = teacher_toks["other"]
    dirs = {}
    for name, preset, tok in (("student", "tiny-dense", student_tok), ("teacher", "tiny-moe", t_tok)):
        dirs[name] = tmp_path / name
        load_model(preset, tokenizer=tok, seed=3).save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    args = ["eval", str(dirs["student"]), "--data", str(data), "--format", "chat", "--block-size", "96"]
    args += [
        "--teacher",
        str(dirs["teacher"]),
        "--prompts",
        "3",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "1",
    ]
    capsys.readouterr()
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)

    student = AutoModelForCausalLM.from_pretrained(dirs["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(dirs["teacher"]).eval()
    stops = sorted(_stops(student_tok))
    nll, tokens, n_bytes = 0.0, 0, 0
    for conv in CONVERSATIONS:
        last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
        prefix = conv[: last_user + 1]
        text = student_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([student_tok(text, add_special_tokens=False)["input_ids"]])
        out = student.generate(
            ids, max_new_tokens=6, do_sample=False, eos_token_id=stops, pad_token_id=student_tok.pad_token_id
        )[0, ids.shape[1] :].tolist()
        cut = next((j + 1 for j, t in enumerate(out) if t in stops), len(out))
        answer_ids, ended = out[:cut], out[cut - 1] in stops
        answer = student_tok.decode(answer_ids[:-1] if ended else answer_ids)
        head = t_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
        full = t_tok.apply_chat_template([*prefix, {"role": "assistant", "content": answer}], tokenize=False)
        stop = len(head) + len(answer) + (len("<|end|>") if ended else 0)
        enc = t_tok(full, add_special_tokens=False, return_offsets_mapping=True)
        t_ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(teacher(t_ids).logits[0].double(), -1)
        for j, (_, end) in enumerate(enc["offset_mapping"]):
            if len(head) < end <= stop:
                nll -= float(logp[j - 1, enc["input_ids"][j]])
        tokens += len(answer_ids)
        n_bytes += len(answer.encode("utf-8"))
    assert result["cont_prompts"] == 3 and result["cont_greedy_tokens"] == pytest.approx(tokens / 3)
    assert result["cont_greedy_teacher_nll"] == pytest.approx(nll / tokens, rel=1e-4)
    assert result["cont_greedy_teacher_bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)
    assert math.isfinite(result["cont_sampled_teacher_nll"]) and result["cont_sampled_tokens"] <= 6
