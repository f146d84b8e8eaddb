"""Prompts and answers at the edges of chat / text policy distillation: text prompts stay inside one document, and
answers with outer whitespace under templates that trim their content (Llama 3's, Gemma's). Split from
tests/test_chat_policy.py (its templates and conversations are shared from there)."""

from __future__ import annotations

import pytest
import torch
from test_chat_policy import CHATML, CONVERSATIONS, OTHER, _with_template
from transformers import AutoTokenizer

from sakd.commands.demo import train_tokenizer


def test_text_prompts_stay_inside_one_document_with_within_document_packing(tokenizer_dir):
    """Review defect (issue 24): with data.packing=within_document a text block holds several documents that
    never attend to each other; a policy step's prompt used to be the block's first tokens, across them."""
    from sakd.config import GenerationConfig
    from sakd.data import BatchPlan, make_batch
    from sakd.policy.prompts import Prompts

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos = tok.eos_token_id
    a = tok("short one", add_special_tokens=False)["input_ids"][:3] + [eos]
    b = tok("a longer document about the river and the sea", add_special_tokens=False)["input_ids"] + [eos]
    c = tok("the next one", add_special_tokens=False)["input_ids"][:2]  # a document's first tokens
    ids = torch.tensor([a + b + c, c + a + b])
    positions = torch.tensor(
        [[*range(len(a)), *range(len(b)), *range(len(c))], [*range(len(c)), *range(len(a)), *range(len(b))]]
    )
    batch = make_batch(ids, [0, 1], eos_id=eos, positions=positions)
    plan = BatchPlan(num_blocks=2, micro_batch=2, accumulation=1, world_size=1, seed=0)
    prompts = Prompts(GenerationConfig(prompt_tokens=6), tok, tok, plan)
    ((rows, _),) = prompts.for_step([batch], 0, 0)
    assert len(b) - 1 >= 6 and rows == [b[:6], b[:6]]  # the first piece long enough: b in both rows
    short = Prompts(GenerationConfig(prompt_tokens=40), tok, tok, plan).for_step([batch], 0, 0)[0][0]
    assert short == [b[:-1], b[:-1]]  # none long enough: the longest piece, without its EOS


# Llama 3's and Gemma's templates render ``message['content'] | trim``
TRIM_CHATML = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
TRIM_OTHER = OTHER.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")


@pytest.mark.parametrize("writer", ["student", "teacher"])
def test_answers_with_outer_whitespace_under_trimming_templates(tokenizer_dir, corpus, tmp_path, writer):
    """Review defect (issue 24): a template that trims message contents (Llama 3, Gemma) renders a written
    answer " Bob lives \\n" as "Bob lives", and building the step's rows failed mid-run ("the chat template
    changes message 1's content") whenever a sampled answer began or ended with whitespace. Now the writer's
    tokens stay as written, the reader reads the answer as its own template shows it (trimmed), and every
    scored position's anchor has read the same answer characters as the student."""
    from sakd.data import BatchPlan
    from sakd.policy.chat_answers import ChatPrompts

    s_tok = _with_template(tokenizer_dir, ["<|im_start|>", "<|im_end|>"], TRIM_CHATML, tmp_path / "s")
    base = train_tokenizer(corpus, tmp_path / "tbase", 300)
    markers = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    t_tok = _with_template(base, markers, TRIM_OTHER, tmp_path / "t")
    w_tok, r_tok = (s_tok, t_tok) if writer == "student" else (t_tok, s_tok)
    stop = w_tok.convert_tokens_to_ids("<|im_end|>" if writer == "student" else "<|end|>")
    prompts = ChatPrompts(CONVERSATIONS, w_tok, BatchPlan(3, 1, 1, 1, 0), 1000)
    answers = [" Bob lives in Stanford .", "they eat bread \n", " the river "]
    completions = [
        w_tok(a, add_special_tokens=False)["input_ids"] + [stop] * (i != 1) for i, a in enumerate(answers)
    ]
    rows = prompts.rows(torch.arange(3), completions, s_tok, t_tok, teacher_writes=writer == "teacher")
    scored = 0
    for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
        prefix = prompts.prefixes[i]
        s_head = s_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
        t_head = t_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
        teacher, anchor = row.paired.teacher.ids, row.paired.alignment.anchor.tolist()
        written, read = (row.student_ids, teacher) if writer == "student" else (teacher, row.student_ids)
        r_head = t_head if writer == "student" else s_head
        assert written == prompts.ids[i] + completions[i]  # the writer's tokens as written
        assert r_tok.decode(read).startswith(r_head + answer.strip())  # the reader: its template's view
        for p in range(len(row.student_ids) - 1):
            s_text, t_text = s_tok.decode(row.student_ids[: p + 1]), t_tok.decode(teacher[: anchor[p] + 1])
            if anchor[p] < 0 or not s_text.startswith(s_head):
                continue  # no KD, or a position of the prompt
            assert t_text.startswith(t_head)
            assert s_text[len(s_head) :].lstrip() == t_text[len(t_head) :].lstrip()
            scored += 1
    assert scored >= 6


def test_teacher_bpb_counts_the_bytes_the_trimming_teacher_scored(tokenizer_dir, corpus, tmp_path):
    """Review defect: under a trimming template the teacher scores ``answer.strip()``; the bytes per answer
    of ``teacher_bpb`` are those of what it scored, not of the answer with its outer whitespace."""
    from sakd.policy.chat_eval import answer_view

    s_tok = _with_template(tokenizer_dir, ["<|im_start|>", "<|im_end|>"], CHATML, tmp_path / "s")
    base = train_tokenizer(corpus, tmp_path / "tbase", 300)
    t_tok = _with_template(
        base, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], TRIM_OTHER, tmp_path / "t"
    )
    stop = s_tok.convert_tokens_to_ids("<|im_end|>")
    prefix = [{"role": "user", "content": "Where does Bob live?"}]
    answer = "  Bob lives in Stanford . \n"
    completion = s_tok(answer, add_special_tokens=False)["input_ids"] + [stop]
    assert s_tok.decode(completion[:-1]) == answer
    ids, first, n_bytes = answer_view(prefix, completion, s_tok, t_tok, [stop])
    head = t_tok.apply_chat_template(prefix, add_generation_prompt=True, tokenize=False)
    assert t_tok.decode(ids).startswith(head + answer.strip())  # what the teacher scored
    assert n_bytes == len(answer.strip().encode("utf-8")) < len(answer.encode("utf-8"))
