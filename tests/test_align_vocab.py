"""Vocabulary alignment by token bytes (sakd.align.vocab), on tokenizers built in the test."""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sakd.align import VocabMap, build_vocab_map, load_or_build_vocab_map, token_bytes
from sakd.losses.vocab_map import check_vocab_map

WORDS = (
    "the of and to in is was for on that with as by at from his her they this which had not "
    "are were been has have but one all would there their what so up out if about who get "
    "distillation teacher student token tokenizer vocabulary model café naïve"
).split()

BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ",\n", ".\n\n"]))
    return lines


def _byte_level(vocab_size: int, special: list[str], **roles: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=BYTE_ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


SP_PIECES = ["▁the", "▁of", "▁and", "▁teacher", "▁student", "▁", "A", "t", "h", "e", "the", "é", "▁café"]


def _sentencepiece() -> PreTrainedTokenizerFast:
    """A sentencepiece-style Unigram model: '▁' word marker, '<0xNN>' byte-fallback pieces."""
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab += [(piece, -1.0 - i / 10) for i, piece in enumerate(SP_PIECES)]
    vocab += [(ch, -5.0) for ch in "abcdfgijklmnopqrsuvwxyz.,!?TDS"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def student() -> PreTrainedTokenizerFast:
    return _byte_level(
        300,
        ["<|endoftext|>", "<|pad|>", "<|sep|>"],
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


@pytest.fixture(scope="module")
def teacher() -> PreTrainedTokenizerFast:
    return _byte_level(
        600,
        ["</s>", "<pad>", "<|im_start|>", "<|sep|>"],
        eos_token="</s>",
        pad_token="<pad>",
    )


@pytest.fixture(scope="module")
def sp() -> PreTrainedTokenizerFast:
    return _sentencepiece()


def _assert_valid(vmap: VocabMap, s_tok, t_tok) -> None:
    """The map is a valid one-to-one partial map, its inverse matches, mapped pairs agree on bytes."""
    assert vmap.student_vocab == len(s_tok) and vmap.teacher_vocab == len(t_tok)
    check_vocab_map(vmap.student_to_teacher, len(s_tok), len(t_tok))
    check_vocab_map(vmap.teacher_to_student, len(t_tok), len(s_tok))
    assert vmap.student_to_teacher.dtype == vmap.teacher_to_student.dtype == torch.int64
    s_ids = (vmap.student_to_teacher >= 0).nonzero().squeeze(-1)
    t_ids = vmap.student_to_teacher[s_ids]
    assert torch.equal(vmap.teacher_to_student[t_ids], s_ids)
    assert int((vmap.teacher_to_student >= 0).sum()) == s_ids.numel() == vmap.num_mapped
    sb, tb = token_bytes(s_tok), token_bytes(t_tok)
    for s, t in zip(s_ids.tolist(), t_ids.tolist(), strict=True):
        # Special tokens (no bytes) pair only with special tokens; the rest by equal bytes.
        assert (sb[s] is None) == (tb[t] is None), (s, t, sb[s], tb[t])
        assert sb[s] == tb[t], (s, t, sb[s], tb[t])
    assert 0.0 < vmap.student_coverage <= 1.0


def test_token_bytes_byte_level_round_trips_text(student: PreTrainedTokenizerFast) -> None:
    data = token_bytes(student)
    assert len(data) == len(student)
    text = "The teacher and the student.\nCafé naïve\t  tokens!"
    ids = student.encode(text, add_special_tokens=False)
    assert b"".join(data[i] for i in ids) == text.encode("utf-8")
    assert data[student.convert_tokens_to_ids("Ġ")] == b" "
    assert data[student.convert_tokens_to_ids("Ċ")] == b"\n"
    for special in student.all_special_ids:
        assert data[special] is None


def test_token_bytes_sentencepiece_byte_fallback(sp: PreTrainedTokenizerFast) -> None:
    data = token_bytes(sp)
    assert len(data) == len(sp)
    ids = sp.convert_tokens_to_ids
    assert data[ids("▁the")] == b" the"
    assert data[ids("▁")] == b" "
    assert data[ids("<0x0A>")] == b"\n"
    assert data[ids("<0x41>")] == data[ids("A")] == b"A"
    assert data[ids("é")] == "é".encode()
    assert all(data[i] is None for i in sp.all_special_ids)
    # Concatenated token bytes are the text (with sentencepiece's leading '▁'), byte fallback included.
    text = "the teacher\nþ café"
    enc = sp.encode(text, add_special_tokens=False)
    assert ids("<0x0A>") in enc  # the newline really goes through byte fallback
    assert b"".join(data[i] for i in enc) == (" " + text).encode("utf-8")


def test_token_bytes_wordpiece() -> None:
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "##the", "s", "##s", "é"])
    }
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    wp = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    data = token_bytes(wp)
    assert data[:4] == [None] * 4
    assert data[4:] == [b"the", b"the", b"s", b"s", "é".encode()]
    # Against itself: the identity, even with two ids per byte string.
    assert build_vocab_map(wp, wp).is_identity()


def test_byte_level_pair_invariants(student, teacher) -> None:
    vmap = build_vocab_map(student, teacher)
    _assert_valid(vmap, student, teacher)
    # The smaller vocabulary's base byte alphabet is mapped in full, onto the same characters.
    for ch in BYTE_ALPHABET:
        s = student.convert_tokens_to_ids(ch)
        assert vmap.student_to_teacher[s] == teacher.convert_tokens_to_ids(ch), ch
    # Same corpus, same trainer: the small vocabulary's merges are all in the large one.
    s_bytes = token_bytes(student)
    for s in range(len(student)):
        if s_bytes[s] is not None:
            t = int(vmap.student_to_teacher[s])
            assert t >= 0 and teacher.convert_ids_to_tokens(t) == student.convert_ids_to_tokens(s)
    # Special tokens: eos<->eos and pad<->pad by role (different strings), the rest by string.
    assert vmap.student_to_teacher[student.eos_token_id] == teacher.eos_token_id
    assert vmap.student_to_teacher[student.pad_token_id] == teacher.pad_token_id
    sep = student.convert_tokens_to_ids("<|sep|>")
    assert vmap.student_to_teacher[sep] == teacher.convert_tokens_to_ids("<|sep|>")
    assert vmap.teacher_to_student[teacher.convert_tokens_to_ids("<|im_start|>")] == -1
    assert vmap.student_coverage == 1.0
    stats = vmap.stats()
    assert json.loads(json.dumps(stats)) == stats
    assert stats["mapped"] == len(student) and stats["teacher_vocab"] == len(teacher)
    assert stats["teacher_vocab_coverage"] == pytest.approx(len(student) / len(teacher))
    # The other direction is the transpose.
    back = build_vocab_map(teacher, student)
    _assert_valid(back, teacher, student)
    assert torch.equal(back.student_to_teacher, vmap.teacher_to_student)
    assert back.student_coverage < 1.0


def test_identical_tokenizers_give_identity(student, tmp_path: Path) -> None:
    assert build_vocab_map(student, student).is_identity()
    student.save_pretrained(tmp_path / "copy")
    copy = PreTrainedTokenizerFast.from_pretrained(tmp_path / "copy")
    vmap = build_vocab_map(student, copy)
    assert vmap.is_identity()
    _assert_valid(vmap, student, copy)


def test_sentencepiece_vs_byte_level(sp, teacher) -> None:
    vmap = build_vocab_map(sp, teacher)
    _assert_valid(vmap, sp, teacher)
    s, t = sp.convert_tokens_to_ids, teacher.convert_tokens_to_ids
    assert teacher.convert_ids_to_tokens(t("Ġthe")) == "Ġthe"  # precondition: a real merge
    assert vmap.student_to_teacher[s("▁the")] == t("Ġthe")
    assert vmap.teacher_to_student[t("Ġthe")] == s("▁the")
    assert vmap.student_to_teacher[s("▁")] == t("Ġ")
    assert vmap.student_to_teacher[s("<0x0A>")] == t("Ċ")
    # 'A' and '<0x41>' have the same bytes: the real piece takes the teacher's 'A'.
    assert vmap.student_to_teacher[s("A")] == t("A")
    assert vmap.student_to_teacher[s("<0x41>")] == -1
    # A byte with no real piece is matched through its fallback piece.
    assert vmap.student_to_teacher[s("<0x07>")] == t("ć")  # GPT-2's byte table: 0x07 -> chr(256 + 7)
    # 'é' is two bytes: one sentencepiece piece, two byte-level characters -> unmapped unless merged.
    e_acute = token_bytes(sp)[s("é")]
    assert e_acute == b"\xc3\xa9"
    assert vmap.student_to_teacher[s("é")] == teacher.get_vocab().get("Ã©", -1)
    # Roles: eos<->eos; bos and unk have no teacher counterpart.
    assert vmap.student_to_teacher[sp.eos_token_id] == teacher.eos_token_id
    assert vmap.student_to_teacher[sp.unk_token_id] == -1
    # Byte-level student, sentencepiece teacher: 'A' prefers the real piece over '<0x41>'.
    back = build_vocab_map(teacher, sp)
    _assert_valid(back, teacher, sp)
    assert back.student_to_teacher[t("A")] == s("A")
    assert back.student_to_teacher[t("Ċ")] == s("<0x0A>")
    for ch in BYTE_ALPHABET:  # every byte of the byte-level side has a sentencepiece counterpart
        assert back.student_to_teacher[t(ch)] >= 0, ch


def test_cache_round_trip_and_corruption(student, teacher, tmp_path: Path) -> None:
    built = build_vocab_map(student, teacher)
    vmap, loaded = load_or_build_vocab_map(student, teacher, tmp_path / "cache")
    assert not loaded
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].name.startswith("vocab_map-")
    assert files[0].name.endswith(".safetensors") and len(files[0].name) == len("vocab_map-.safetensors") + 16
    assert torch.equal(vmap.student_to_teacher, built.student_to_teacher)

    again, loaded = load_or_build_vocab_map(student, teacher, str(tmp_path / "cache"))
    assert loaded
    assert torch.equal(again.student_to_teacher, built.student_to_teacher)
    assert torch.equal(again.teacher_to_student, built.teacher_to_student)
    assert (again.student_vocab, again.teacher_vocab) == (built.student_vocab, built.teacher_vocab)

    # Another pair (the reverse direction) gets its own file.
    _, loaded = load_or_build_vocab_map(teacher, student, tmp_path / "cache")
    assert not loaded and len(list((tmp_path / "cache").iterdir())) == 2

    # A truncated file: one warning line, rebuilt, overwritten, then loads again.
    path = files[0]
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(UserWarning, match="rebuilding") as record:
        rebuilt, loaded = load_or_build_vocab_map(student, teacher, tmp_path / "cache")
    assert not loaded and len(record) == 1 and "\n" not in str(record[0].message)
    assert torch.equal(rebuilt.student_to_teacher, built.student_to_teacher)
    _, loaded = load_or_build_vocab_map(student, teacher, tmp_path / "cache")
    assert loaded

    # A well-formed file with the wrong content (not the inverse, no key): rebuilt too.
    bad = built.student_to_teacher.clone()
    bad[bad >= 0] = bad[bad >= 0].flip(0)
    save_file({"student_to_teacher": bad, "teacher_to_student": built.teacher_to_student}, str(path))
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt, loaded = load_or_build_vocab_map(student, teacher, tmp_path / "cache")
    assert not loaded and torch.equal(rebuilt.student_to_teacher, built.student_to_teacher)
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]

    # The right tensors under another pair's key (e.g. a renamed file): rebuilt too.
    tensors = {"student_to_teacher": built.student_to_teacher, "teacher_to_student": built.teacher_to_student}
    save_file(tensors, str(path), metadata={"key": "0" * 64})
    with pytest.warns(UserWarning, match="key mismatch"):
        _, loaded = load_or_build_vocab_map(student, teacher, tmp_path / "cache")
    assert not loaded
    assert load_or_build_vocab_map(student, teacher, tmp_path / "cache")[1]

    # No cache dir: nothing written.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vmap, loaded = load_or_build_vocab_map(student, teacher, None)
    assert not loaded and torch.equal(vmap.student_to_teacher, built.student_to_teacher)


def test_teacher_mass_mapped_by_hand() -> None:
    vmap = VocabMap(
        student_to_teacher=torch.tensor([2, -1, 0]),
        teacher_to_student=torch.tensor([2, -1, 0, -1]),
        student_vocab=3,
        teacher_vocab=4,
    )
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    # Mapped teacher ids are {0, 2}: rows hold 0.4, 0.5, 0.8 there.
    assert vmap.teacher_mass_mapped(probs.log()).item() == pytest.approx((0.4 + 0.5 + 0.8) / 3)
    assert vmap.teacher_mass_mapped(probs[:1].log()).item() == pytest.approx(0.4)
    assert vmap.teacher_mass_mapped(probs.log().expand(2, 3, 4)).item() == pytest.approx(1.7 / 3)
    with pytest.raises(ValueError):
        vmap.teacher_mass_mapped(torch.zeros(2, 3))
    assert vmap.num_mapped == 2 and vmap.student_coverage == pytest.approx(2 / 3)
    assert not vmap.is_identity()
    assert vmap.stats() == {
        "student_vocab": 3,
        "teacher_vocab": 4,
        "mapped": 2,
        "student_coverage": pytest.approx(2 / 3),
        "teacher_vocab_coverage": 0.5,
    }
    ident = VocabMap(torch.arange(4), torch.arange(4), 4, 4)
    assert ident.is_identity() and ident.teacher_mass_mapped(probs.log()).item() == pytest.approx(1.0)
    assert not VocabMap(torch.arange(4), torch.arange(5)[:4], 4, 5).is_identity()


def _synthetic(words: range, n_letters: int = 4) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the 256-char alphabet plus one 'Ġ'-word per number in ``words``."""

    def word(n: int) -> str:
        return "Ġ" + "".join(chr(ord("a") + (n // 26**k) % 26) for k in range(n_letters))

    vocab = {ch: i for i, ch in enumerate(BYTE_ALPHABET)}
    for n in words:
        vocab[word(n)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    return fast


def test_large_vocab_is_linear() -> None:
    student = _synthetic(range(0, 50_000))
    teacher = _synthetic(range(25_000, 150_000))
    start = time.perf_counter()
    vmap = build_vocab_map(student, teacher)
    elapsed = time.perf_counter() - start
    print(f"build_vocab_map {len(student)} x {len(teacher)}: {elapsed:.2f}s")
    # alphabet + the 25,000 shared words + eos
    assert vmap.num_mapped == 256 + 25_000 + 1
    assert vmap.student_to_teacher[256 + 25_000] == 256  # first shared word
    check_vocab_map(vmap.student_to_teacher, len(student), len(teacher))
    assert math.isclose(vmap.stats()["teacher_vocab_coverage"], vmap.num_mapped / len(teacher))
