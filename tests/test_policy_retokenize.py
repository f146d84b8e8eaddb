"""Generated text in the other tokenizer (sakd/policy/retokenize.py): every anchor of the re-tokenized
sequence joins two equal prefixes of one text, checked with each tokenizer's own ``decode``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sakd.policy.retokenize import encode, pair_student_written, pair_teacher_written, spell

QWEN = Path("/work/scratch/assets/out/qwen2-tokenizer")


@pytest.fixture(scope="module")
def tokenizers(corpus, tokenizer_dir, tmp_path_factory):
    from sakd.commands.demo import train_tokenizer
    from sakd.models import load_tokenizer

    teacher_dir = train_tokenizer(corpus, tmp_path_factory.mktemp("ttok") / "teacher", 700)
    return load_tokenizer(str(tokenizer_dir)), load_tokenizer(str(teacher_dir))


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _sequences(tok, corpus, n=12, seed=0):
    """Canonical tokens of corpus lines, and the same with random tokens appended (what a sampling model
    writes: byte tokens that split characters, EOS in the middle, non-canonical merges)."""
    g = torch.Generator().manual_seed(seed)
    lines = [x for x in Path(corpus).read_text().splitlines() if x.strip()][:n]
    out = []
    for i, line in enumerate(lines):
        ids = tok(line, add_special_tokens=False)["input_ids"][:40]
        noise = torch.randint(0, len(tok), (24,), generator=g).tolist()
        noise = [t for t in noise if t != tok.pad_token_id]
        out.append(ids)
        out.append(ids[:10] + ([tok.eos_token_id] if i % 2 else []) + noise + ids[10:20])
    out.append([tok.convert_tokens_to_ids("Ã")] * 3 + ids[:5])  # 0xC3 bytes that never complete a character
    return out


def _check_anchors_join_equal_prefixes(paired, student_tok, teacher_tok):
    s_ids, t_ids = paired.student.ids, paired.teacher.ids
    anchor, span_end = paired.alignment.anchor.tolist(), paired.alignment.span_end.tolist()
    assert any(a >= 0 for a in anchor)
    previous = -1
    for s, t in enumerate(anchor):
        if t < 0:
            continue
        assert t > previous  # anchors advance with the student
        previous = t
        assert _decode(student_tok, s_ids[: s + 1]) == _decode(teacher_tok, t_ids[: t + 1]), (s, t)
        if span_end[s] >= 0:  # the teacher tokens t+1..e spell student token s+1
            e = span_end[s]
            assert _decode(student_tok, s_ids[: s + 2]) == _decode(teacher_tok, t_ids[: e + 1])


def test_spell_of_a_canonical_tokenization_is_the_text_with_the_tokenizers_offsets(tokenizers, corpus):
    student, _ = tokenizers
    text = Path(corpus).read_text().splitlines()[3]
    enc = student(text, add_special_tokens=False, return_offsets_mapping=True)
    spelled = spell(enc["input_ids"], student)
    assert [p.text for p in spelled.pieces] == [text]
    assert [end for _, end in spelled.spans] == [end for _, end in enc["offset_mapping"]]


def test_student_written_text_aligns_in_the_teachers_tokens(tokenizers, corpus):
    student, teacher = tokenizers
    assert student.get_vocab() != teacher.get_vocab()
    for ids in _sequences(student, corpus):
        paired = pair_student_written(ids, student, teacher)
        assert paired.student.ids == ids  # the student's own tokens are kept, not re-tokenized
        _check_anchors_join_equal_prefixes(paired, student, teacher)


def test_teacher_written_text_aligns_in_the_students_tokens(tokenizers, corpus):
    student, teacher = tokenizers
    for ids in _sequences(teacher, corpus, seed=1):
        paired = pair_teacher_written(ids, student, teacher)
        assert paired.teacher.ids == ids
        _check_anchors_join_equal_prefixes(paired, student, teacher)


def test_special_tokens_map_by_role_and_are_one_character(tokenizers):
    student, teacher = tokenizers
    ids = student("one two", add_special_tokens=False)["input_ids"]
    spelled = spell([*ids, student.eos_token_id, *ids], student)
    assert [p.role for p in spelled.pieces] == [None, "eos", None]
    assert spelled.spans[len(ids)] == (7, 8)
    assert encode(spelled.pieces, teacher).ids.count(teacher.eos_token_id) == 1


@pytest.mark.skipif(not QWEN.is_dir(), reason="the Qwen tokenizer asset is not on this machine")
def test_alignment_with_the_real_qwen_tokenizer(tokenizers, corpus):
    from sakd.models import load_tokenizer

    student, _ = tokenizers
    qwen = load_tokenizer(str(QWEN))
    for ids in _sequences(student, corpus, n=4):
        _check_anchors_join_equal_prefixes(pair_student_written(ids, student, qwen), student, qwen)
