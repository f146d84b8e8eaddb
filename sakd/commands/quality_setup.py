"""What one ``sakd bench quality`` output directory is made of, and when its work may be reused: the
:class:`Setup` every run shares, the key a finished run is reused under (:func:`setup_key`), the
warm-up rule (:func:`warmup_for`), and ``OUT/bench.json`` (:func:`check_bench`): what the shared artefacts
-- the split, the trained tokenizer, a pretrained preset teacher, the caches -- were made from, so that a
rerun with other settings stops instead of silently reusing them."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sakd.errors import ConfigError, DataError

WARMUP_RULE = "min(warmup_steps, steps // 10), at least 1"


def warmup_for(requested: int, steps: int) -> int:
    """The warm-up a run of ``steps`` optimizer steps gets: --warmup-steps, but never more than a tenth
    of the run (at least 1 step) -- ``sakd demo``'s rule."""
    return max(1, min(requested, steps // 10))


def run_steps(train_blocks: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps of a run over ``train_blocks`` blocks (the trainer's count: whole steps per epoch
    times ``epochs``, rounded down, at least 1)."""
    return max(1, math.floor(train_blocks // batch_size * epochs))


@dataclass
class Setup:
    """What every run of one benchmark shares."""

    teacher: str
    student: str
    tokenizer: str
    teacher_tokenizer: str | None
    files: dict[str, str]
    block_size: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    out: Path
    eval_stride: int
    max_eval_tokens: int | None = None
    data: str = ""  # the user's file the splits come from
    sample_by: str = "line"
    text_field: str = "text"
    teacher_steps: int | None = None  # a preset teacher's pretraining steps (None: a given teacher)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
"""Files a tokenizer digest skips: when the tokenizer is a model's directory, hashing its weights (gigabytes,
once per run) would say nothing about the tokenizer."""


@functools.lru_cache(maxsize=32)
def spec_digest(spec: str | None) -> str | None:
    """A tokenizer directory by its contents: the sha256 of its files' names and bytes, weights and hidden
    files (a hub download's ``.cache/``) left out; a hub id or preset stands for itself."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and not any(x.startswith(".") for x in rel.parts):
            h.update(rel.as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with Path(path).expanduser().open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def setup_key(s: Setup) -> str:
    """What a run's numbers depend on besides its :class:`~sakd.commands.quality_runs.Run` fields: a
    finished run is reused on a rerun only with the same key (same models, tokenizers by content, data and
    its split, teacher pretraining, batch and schedule with its warm-up rule, scoring)."""
    fields: list[Any] = [s.teacher, s.student, spec_digest(s.tokenizer), spec_digest(s.teacher_tokenizer)]
    fields += [s.block_size, s.batch_size, s.learning_rate, s.warmup_steps, WARMUP_RULE, s.eval_stride]
    fields += [s.max_eval_tokens, s.sample_by, s.text_field, s.teacher_steps]
    h = hashlib.sha256(json.dumps(fields).encode())
    h.update(file_sha256(s.data).encode())
    return h.hexdigest()[:16]


def _local(spec: str | None) -> str | None:
    """A local directory as an absolute path; anything else as given."""
    if spec is None or not Path(spec).expanduser().is_dir():
        return spec
    return str(Path(spec).expanduser().resolve())


def bench_fields(args: Any, teacher: str, opts: dict[str, Any], preset_teacher: bool) -> dict[str, Any]:
    """What the output directory's shared artefacts depend on (``OUT/bench.json``)."""
    if not Path(args.data).expanduser().is_file():
        raise DataError(f"--data file not found: {args.data}")
    trained_tokenizer = preset_teacher and not args.tokenizer
    return {
        "data_sha256": file_sha256(args.data),
        "sample_by": args.sample_by,
        "text_field": args.text_field,
        "teacher": teacher,
        "teacher_steps": opts["teacher_steps"] if preset_teacher else None,
        "tokenizer": _local(args.tokenizer),
        "tokenizer_sha256": spec_digest(_local(args.tokenizer)),
        "teacher_tokenizer": _local(args.teacher_tokenizer),
        "teacher_tokenizer_sha256": spec_digest(_local(args.teacher_tokenizer)),
        "vocab_size": opts["vocab_size"] if trained_tokenizer else None,
        # a preset teacher is pretrained on blocks and batches of these sizes, with this warm-up
        "teacher_pretraining": (
            {k: opts[k] for k in ("block_size", "batch_size", "warmup_steps")} if preset_teacher else None
        ),
    }


def check_bench(out: Path, fields: dict[str, Any]) -> None:
    """Write ``out/bench.json`` on the first invocation (or into an older directory without one); on a
    rerun, stop with one line at the first field that differs (nothing is overwritten)."""
    path = out / "bench.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fields, indent=1) + "\n")
        return
    old = json.loads(path.read_text())
    for key, value in fields.items():
        if old.get(key) != value:
            raise ConfigError(
                f"{out} was made with {key} = {old.get(key)!r}, this invocation has {value!r}: its split, "
                "tokenizer, teacher and caches would not match; choose a new --output-dir"
            )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of ``OUT/runs.jsonl`` (none when it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_to_continue(path: Path, key: str, student: str) -> dict[str, dict[str, Any]]:
    """The finished runs (by name) of ``path`` made with setup ``key`` and ``student``; one line when the
    file holds rows of another setup (continuing there would mix two benchmarks in one table)."""
    rows = read_rows(path)
    others = sorted({str(r.get("setup_key")) for r in rows} - {key})
    if others:
        raise ConfigError(
            f"{path} holds runs of another setup ({', '.join(others)}; this one is {key}): continue into "
            "the output directory of this setup, or a new one"
        )
    return {r["name"]: r for r in rows if r.get("student", student) == student}
