"""The demo's text: the corpus, its four splits, and the two tokenizers trained on the teacher's split.

The splits make the demo's regime: the teacher learns from the whole training part, the student only from a
small subset of it (``student_docs``, repeated for several epochs) -- less data than the teacher's
knowledge, which is what distillation is for. Settings are chosen on the validation documents; the summary
reports on the held-out ones. Neither is ever trained on, the tokenizers included.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sakd.data.synthetic import write_corpus
from sakd.data.text import load_text_dataset
from sakd.errors import DataError

SPLITS = ("teacher", "student", "validation", "heldout")


def cache_root() -> Path:
    return Path(os.environ.get("SAKD_CACHE_DIR", Path.home() / ".cache" / "sakd"))


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int) -> Path:
    """A byte-level BPE tokenizer trained on ``corpus``, saved as a transformers tokenizer directory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fast.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def corpus_file(out: Path, data: str | Path | None, budget: dict[str, Any]) -> Path:
    if data is None:
        corpus = write_corpus(out / "corpus.txt", num_docs=budget["corpus_docs"])
        print(f"[demo] generated corpus {corpus}")
        return corpus
    corpus = Path(data)
    if not corpus.is_file():
        raise FileNotFoundError(f"demo data file not found: {data}")
    return corpus


def tokenizers_for(splits: DemoSplits, budget: dict[str, Any]) -> tuple[Path, Path]:
    """The student's and the teacher's tokenizer directories, trained (once: cached by the text's hash) on the
    teacher's training documents only -- never on the validation or held-out ones, so the text the demo
    reports on shapes nothing it is scored with. The text is ``data/teacher.txt`` (one document after another,
    beside ``teacher.jsonl``)."""
    docs = [json.loads(line)["text"] for line in splits["teacher"].read_text(encoding="utf-8").splitlines()]
    text = splits["teacher"].with_suffix(".txt")
    text.write_text("\n".join(docs) + "\n", encoding="utf-8")
    toks = {}
    for role, size in (("student", budget["vocab_size"]), ("teacher", budget["teacher_vocab_size"])):
        toks[role] = cache_root() / "demo-tokenizer" / f"{file_hash(text)}-v{size}"
        if not (toks[role] / "tokenizer.json").is_file():
            print(
                f"[demo] training the {role}'s byte-level BPE tokenizer ({size} tokens) on the teacher's "
                f"{len(docs)} training documents"
            )
            train_tokenizer(text, toks[role], size)
    return toks["student"], toks["teacher"]


def _cut(text: str, at: int) -> int:
    """The cut nearest before character ``at`` that splits no word (after a line break or space)."""
    cut = max(text.rfind("\n", 0, at), text.rfind(" ", 0, at))
    return cut + 1 if cut > 0 else at


def _split_docs(docs: list[str], budget: dict[str, Any]) -> dict[str, list[str]]:
    """Held-out = the last documents, validation = the ones before them, the teacher's = the rest, the
    student's = the first ``student_docs`` of the teacher's (shares of ``corpus_docs`` for other corpora).
    One document (a whole file) is cut into the same shares by characters."""
    total = budget["corpus_docs"]
    shares = {k: budget[f"{k}_docs"] / total for k in ("heldout", "validation", "student")}
    if len(docs) == 1:
        text = docs[0]
        ends = [_cut(text, int(len(text) * (1 - shares["heldout"] - shares["validation"]))), 0]
        ends[1] = _cut(text, int(len(text) * (1 - shares["heldout"])))
        teacher = text[: ends[0]]
        parts = {
            "teacher": [teacher],
            "student": [teacher[: _cut(teacher, int(len(text) * shares["student"]))]],
            "validation": [text[ends[0] : ends[1]]],
            "heldout": [text[ends[1] :]],
        }
    else:
        n = len(docs)
        if n < 4:
            raise DataError(f"demo data holds {n} documents: it needs 1 (cut by characters) or at least 4")
        n_held, n_val = (max(1, round(n * shares[k])) for k in ("heldout", "validation"))
        teacher = docs[: n - n_held - n_val]
        parts = {
            "teacher": teacher,
            "student": teacher[: max(1, round(n * shares["student"]))],
            "validation": docs[n - n_held - n_val : n - n_held],
            "heldout": docs[n - n_held :],
        }
    for name, texts in parts.items():
        if not texts or not any(t.strip() for t in texts):
            raise DataError(f"demo data is too short for a {name} split")
    return parts


@dataclass(frozen=True)
class DemoSplits:
    """The four splits as .jsonl files (one document per record: line breaks inside a document are kept)."""

    files: dict[str, Path]
    documents: dict[str, int]

    def __getitem__(self, name: str) -> Path:
        return self.files[name]


def write_splits(corpus: Path, out: Path, budget: dict[str, Any], sample_by: str) -> DemoSplits:
    docs = [row["text"] for row in load_text_dataset(str(corpus), sample_by=sample_by)]
    if not docs:
        raise DataError(f"demo data {corpus} holds no non-empty documents")
    parts = _split_docs(docs, budget)
    (out / "data").mkdir(parents=True, exist_ok=True)
    files = {}
    for name in SPLITS:
        files[name] = out / "data" / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in parts[name]), encoding="utf-8")
    counts = {name: len(parts[name]) for name in SPLITS}
    print(
        "[demo] documents: teacher {teacher}, student {student} (a subset of the teacher's), validation "
        "{validation}, held-out {heldout}".format(**counts)
    )
    return DemoSplits(files, counts)
