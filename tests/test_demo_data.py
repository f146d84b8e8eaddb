"""The demo's text preparation: its tokenizers learn from the training documents only."""

from __future__ import annotations

from pathlib import Path

from sakd.commands.demo_data import tokenizers_for, write_splits
from sakd.data.synthetic import write_corpus

BUDGET = {
    "corpus_docs": 60,
    "heldout_docs": 10,
    "validation_docs": 10,
    "student_docs": 5,
    "vocab_size": 300,
    "teacher_vocab_size": 340,
}
STRANGE = "zqxjw vuqqy zqxjw vuqqy zqxjw kkwoz"  # words the generated corpus never writes


def _tokenizers(corpus: Path, out: Path) -> tuple[Path, Path]:
    return tokenizers_for(write_splits(corpus, out, BUDGET, "line"), BUDGET)


def _files(tok_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tok_dir.iterdir())}


def test_tokenizers_never_learn_from_validation_or_heldout_text(tmp_path, monkeypatch):
    """Rewriting the validation and held-out documents leaves both tokenizers byte-identical (trained afresh,
    in another cache), and none of their words is a token; rewriting a training document makes new ones."""
    lines = write_corpus(tmp_path / "corpus.txt", num_docs=BUDGET["corpus_docs"]).read_text().splitlines()
    cut = BUDGET["corpus_docs"] - BUDGET["heldout_docs"] - BUDGET["validation_docs"]
    rewritten = tmp_path / "rewritten.txt"
    rewritten.write_text("\n".join(lines[:cut] + [STRANGE] * (len(lines) - cut)) + "\n")

    monkeypatch.setenv("SAKD_CACHE_DIR", str(tmp_path / "cache_a"))
    original = _tokenizers(tmp_path / "corpus.txt", tmp_path / "a")
    monkeypatch.setenv("SAKD_CACHE_DIR", str(tmp_path / "cache_b"))  # an empty cache: trained again
    changed = _tokenizers(rewritten, tmp_path / "b")
    for before, after in zip(original, changed, strict=True):
        assert (tmp_path / "cache_b") in after.parents  # not a cache hit
        assert _files(after) == _files(before)
        vocab = (after / "tokenizer.json").read_text()
        assert "zqxj" not in vocab and "vuqq" not in vocab

    # the cache is keyed by the training text: changed training documents train new tokenizers, which
    # learn the words (so their absence above is no accident of the vocabulary size)
    retrained = tmp_path / "retrained.txt"
    retrained.write_text("\n".join([STRANGE] * 20 + lines[20:]) + "\n")
    fresh = _tokenizers(retrained, tmp_path / "c")
    assert all(f != c for f, c in zip(fresh, changed, strict=True))
    assert "zqxj" in (fresh[0] / "tokenizer.json").read_text()
