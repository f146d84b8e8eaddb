"""The parts of ``sakd bench quality`` that make things: the three-way split of the data, the teacher (a
preset is pretrained first), the teacher caches (through `sakd cache-teacher`'s code path), and one student
run (through `sakd distill`'s :class:`~sakd.training.trainer.Distiller`) scored on the validation and test
splits by `sakd eval`'s scorer (:func:`sakd.evaluation.heldout.evaluate`)."""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sakd.commands.quality_setup import Setup, run_steps, setup_key, warmup_for
from sakd.errors import ConfigError, DataError

__all__ = ["Setup", "setup_key"]  # re-exported: the bench and benchmarks/ build them through this module

SPLITS = ("train", "validation", "test")
SEGMENTS = 20
"""The documents, in file order, are cut into this many contiguous segments; segment ``i`` is validation
when ``i % 10 == 4``, test when ``i % 10 == 9``, else train (80 / 10 / 10, each held-out part spread over
the file but made of whole runs of documents the students never train on)."""


def segment_role(index: int, count: int) -> str:
    """The split of document ``index`` of ``count`` (see :data:`SEGMENTS`)."""
    seg = index * SEGMENTS // count
    return "validation" if seg % 10 == 4 else "test" if seg % 10 == 9 else "train"


def split_data(data: str, sample_by: str, text_field: str, out: Path) -> dict[str, Any]:
    """Write ``out/{train,validation,test}.jsonl`` (one record per document) from ``data``; deterministic."""
    from sakd.data import load_text_dataset

    if not Path(data).expanduser().is_file():
        raise DataError(f"--data file not found: {data}")
    docs = load_text_dataset(data, text_field=text_field, sample_by=sample_by)
    n = len(docs)
    if n < SEGMENTS:
        raise DataError(
            f"{data} holds {n} documents (--sample-by {sample_by}); the train/validation/test split needs at "
            f"least {SEGMENTS}: use --sample-by line or paragraph"
        )
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, text in enumerate(docs["text"]):
        parts[segment_role(i, n)].append(text)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, texts in parts.items():
        files[name] = out / f"{name}.jsonl"
        tmp = files[name].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(files[name])
    return {
        "rule": f"{SEGMENTS} contiguous segments in file order; segment i is validation if i % 10 == 4, "
        "test if i % 10 == 9, else train",
        "documents": {k: len(v) for k, v in parts.items()},
        "characters": {k: sum(map(len, v)) for k, v in parts.items()},
        "files": {k: str(v) for k, v in files.items()},
    }


def recipe(s: Setup, run_dir: Path, *, train_blocks: int | None, seed: int, epochs: float = 1.0) -> dict:
    """A `sakd distill` recipe of this benchmark (CE only until the caller sets the loss); its warm-up is
    --warmup-steps but at most a tenth of the run (:func:`~sakd.commands.quality_setup.warmup_for`)."""
    steps = run_steps(train_blocks, s.batch_size, epochs) if train_blocks else None
    return {
        "model": {
            "teacher": s.teacher,
            "student": s.student,
            "tokenizer": s.tokenizer,
            "teacher_tokenizer": s.teacher_tokenizer,
        },
        "data": {
            "train": s.files["train"],
            "eval": s.files["validation"],  # the trainer's own evaluation: never the test split
            "block_size": s.block_size,
            "max_train_blocks": train_blocks,
            "max_eval_blocks": 4,
        },
        "distillation": {"loss": {"kind": "fkl", "alpha": 0.0, "temperature": 1.0}},
        "optimization": {
            "learning_rate": s.learning_rate,
            "warmup_steps": s.warmup_steps if steps is None else warmup_for(s.warmup_steps, steps),
            "lr_scheduler": "cosine",
            "weight_decay": 0.0,
        },
        "training": {
            "output_dir": str(run_dir),
            "batch_size": s.batch_size,
            "num_epochs": epochs,
            "eval_every": 0,
            "save_every": 0,
            "seed": seed,
        },
        "logging": {"log_every": 10, "progress_bar": False},
    }


def _train(raw: dict[str, Any]) -> dict[str, Any]:
    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    cfg, _ = load_config(raw)
    distiller = Distiller(cfg, resume="none", overwrite=True)
    summary = distiller.train()
    del distiller
    gc.collect()
    return summary


def pretrain_teacher(s: Setup, steps: int) -> tuple[str, dict[str, Any]]:
    """A preset teacher, pretrained on the training split for ``steps`` steps (CE only) once: its directory
    and its pretraining seconds (``pretrain_reused``: measured when it was made, OUT/teacher/pretrain.json; the
    output directory's bench.json guarantees a rerun asks for the same teacher)."""
    final, record = s.out / "teacher" / "final", s.out / "teacher" / "pretrain.json"
    if (final / "model.safetensors").is_file():
        made = json.loads(record.read_text()) if record.is_file() else {}
        return str(final), {"pretrain_seconds": made.get("seconds"), "pretrain_reused": True}
    started = time.perf_counter()
    raw = recipe(s, s.out / "teacher", train_blocks=None, seed=0)
    raw["model"].update(student=s.teacher, teacher=s.teacher, tokenizer=s.teacher_tokenizer or s.tokenizer)
    raw["training"].update(max_steps=steps)
    raw["optimization"].update(learning_rate=2e-3, warmup_steps=warmup_for(s.warmup_steps, steps))
    _train(raw)
    shutil.rmtree(s.out / "teacher" / "checkpoints", ignore_errors=True)
    seconds = round(time.perf_counter() - started, 3)
    record.write_text(json.dumps({"seconds": seconds, "steps": steps}) + "\n")
    return str(final), {"pretrain_seconds": seconds, "pretrain_reused": False}


class Scorer:
    """Held-out bits per byte on the validation and test splits, as `sakd eval` scores them (strided)."""

    def __init__(self, s: Setup) -> None:
        self.setup, self.streams = s, {}

    def stream(self, tokenizer_spec: str, split: str) -> Any:
        """The split's stream under a tokenizer; with --max-eval-tokens N the student tokenizer's first N
        tokens, and under any other tokenizer the same text (cut where the student's N tokens end)."""
        from sakd.data import load_text_dataset, text_stream
        from sakd.models import load_tokenizer

        key = (tokenizer_spec, split)
        if key not in self.streams:
            docs = load_text_dataset(self.setup.files[split])
            n = self.setup.max_eval_tokens
            if n and tokenizer_spec != self.setup.tokenizer:
                docs = docs.from_dict(
                    {"text": cut_text(docs["text"], self.stream(self.setup.tokenizer, split))}
                )
            stream = text_stream(docs, load_tokenizer(tokenizer_spec))
            self.streams[key] = stream.prefix(n) if n and tokenizer_spec == self.setup.tokenizer else stream
        return self.streams[key]

    def score(self, model_dir: str, tokenizer_spec: str) -> dict[str, dict[str, Any]]:
        from sakd.evaluation.heldout import evaluate
        from sakd.models import load_model, load_tokenizer

        model = load_model(model_dir, tokenizer=load_tokenizer(tokenizer_spec)).eval()
        s, out = self.setup, {}
        for split in SPLITS[1:]:
            r = evaluate(
                model,
                self.stream(tokenizer_spec, split),
                batch_size=8,
                window=s.block_size,
                stride=s.eval_stride,
            )
            out[split] = {k: r[k] for k in ("bpb", "loss", "tokens", "bytes", "method")}
        return out


def cut_text(texts: list[str], stream: Any) -> list[str]:
    """The text behind ``stream`` (a prefix of the stream of ``texts``): the documents whose EOS it holds,
    then the next one cut at the UTF-8 byte its last token ends at (a character split there is dropped)."""
    ids, nbytes = stream.ids, stream.nbytes
    if stream.eos_id is not None:
        ends = (ids == stream.eos_id).nonzero().flatten()
        whole = len(ends)
        partial = int(nbytes[int(ends[-1]) + 1 :].sum()) if whole else int(nbytes.sum())
    else:  # no separators: walk the documents by their bytes
        whole, partial = 0, int(nbytes.sum())
        while whole < len(texts) and len(texts[whole].encode()) <= partial:
            partial -= len(texts[whole].encode())
            whole += 1
    out = list(texts[:whole])
    if partial and whole < len(texts):
        out.append(texts[whole].encode()[:partial].decode("utf-8", errors="ignore"))
    return out


def token_count(s: Setup, tokenizer_spec: str) -> int:
    """Tokens of the training split under a tokenizer (documents joined by EOS, as packing sees them)."""
    from sakd.data import load_text_dataset, text_stream
    from sakd.models import load_tokenizer

    return len(text_stream(load_text_dataset(s.files["train"]), load_tokenizer(tokenizer_spec)))


@dataclass(frozen=True)
class CacheSpec:
    """One cache arm: a stored signal (mode with k or draws) at one temperature."""

    mode: str
    size: int  # top_k (topk_tail) or num_samples (sampled)
    temperature: float

    @property
    def arm(self) -> str:
        return f"cache_{self.mode}_{'k' if self.mode == 'topk_tail' else 'n'}{self.size}"

    @property
    def dir_name(self) -> str:
        return f"{self.arm}_T{self.temperature:g}"


def build_cache(s: Setup, spec: CacheSpec, teacher_blocks: int | None) -> dict[str, Any]:
    """Write the cache of one arm once (a rerun finds it complete), by `sakd cache-teacher`'s path."""
    from sakd.commands.cache_teacher import write_cache
    from sakd.config import load_config

    root = s.out / "caches" / f"{spec.dir_name}_blocks{teacher_blocks}"  # a larger budget: a new cache
    raw = recipe(s, s.out / "caches" / "unused-run-dir", train_blocks=teacher_blocks, seed=0)
    raw["distillation"]["loss"].update(alpha=1.0, temperature=spec.temperature)
    key = "top_k" if spec.mode == "topk_tail" else "num_samples"
    raw["distillation"]["cache"] = {"mode": spec.mode, key: spec.size, "temperature": spec.temperature}
    cfg, _ = load_config(raw)
    started = time.perf_counter()
    summary = write_cache(cfg, str(root), overwrite=False) or {}
    seconds, computed = round(time.perf_counter() - started, 3), summary.get("computed_positions", 0)
    record = root.with_name(root.name + ".seconds.json")  # the writing time, kept for a rerun's report
    if computed:
        record.write_text(json.dumps({"seconds": seconds}) + "\n")
    elif record.is_file():
        seconds = json.loads(record.read_text())["seconds"]
    else:  # complete, made by an older version that kept no time
        seconds = None
    manifest = json.loads((root / "manifest.json").read_text())
    positions = manifest["layout"]["positions"]
    return {
        "arm": spec.arm,
        "mode": spec.mode,
        key: spec.size,
        "temperature": spec.temperature,
        "dir": str(root),
        "blocks": manifest["layout"]["blocks"],
        "positions": positions,
        "bytes": manifest["totals"]["bytes"],
        "bytes_per_token": manifest["totals"]["bytes"] / positions,
        "seconds": seconds,  # the writing time when it was made (also on a rerun that found it complete)
        "reused": not computed,
        "computed_positions": computed,
    }


def teacher_blocks_for(s: Setup, budget_tokens: int, student_tokens: int, teacher_tokens: int) -> int:
    """Teacher blocks that cover the text of the student's first ``budget_tokens`` tokens: the same count
    with one tokenizer, else scaled by the token ratio with a 10 % margin (never past the training split)."""
    blocks = math.ceil(budget_tokens / s.block_size)
    if teacher_tokens != student_tokens:
        blocks = math.ceil(blocks * teacher_tokens / student_tokens * 1.1) + 1
    return min(blocks, teacher_tokens // s.block_size)


@dataclass(frozen=True)
class Run:
    """One student run of the grid."""

    arm: str
    budget: int
    epochs: float
    alpha: float
    temperature: float
    seed: int
    cache: str | None = None

    @property
    def name(self) -> str:
        return (
            f"{self.arm}_b{self.budget}_e{self.epochs:g}_a{self.alpha:g}_T{self.temperature:g}_s{self.seed}"
        )


def train_and_score(s: Setup, run: Run, scorer: Scorer) -> dict[str, Any]:
    """Train one run by `sakd distill`'s path, score its final student, keep only its metrics."""
    started = time.perf_counter()
    run_dir = s.out / "runs" / run.name
    raw = recipe(s, run_dir, train_blocks=run.budget // s.block_size, seed=run.seed, epochs=run.epochs)
    raw["distillation"]["loss"].update(alpha=run.alpha, temperature=run.temperature)
    if run.cache:
        raw["distillation"]["teacher_cache"] = run.cache
    summary = _train(raw)
    scores = scorer.score(summary["final_dir"], s.tokenizer)
    for sub in ("final", "checkpoints"):  # the students are not kept: only their scores
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    return {
        **{k: getattr(run, k) for k in ("arm", "budget", "epochs", "alpha", "temperature", "seed")},
        "name": run.name,
        "student": s.student,
        "setup_key": setup_key(s),
        "steps": summary["steps"],
        "tokens_seen": summary["tokens_seen"],
        "train_seconds": summary["train_seconds"],
        "seconds_per_step": summary["train_seconds"] / max(summary["steps"], 1),
        "wall_seconds": round(time.perf_counter() - started, 3),  # with setup, final evaluation, scoring
        "validation_bpb": scores["validation"]["bpb"],
        "test_bpb": scores["test"]["bpb"],
        # the scored text, so that students and teacher can be checked to be scored on the same bytes
        **{f"{split}_{k}": scores[split][k] for split in SPLITS[1:] for k in ("tokens", "bytes")},
    }


def check_model(spec: str, role: str) -> str:
    """A preset name, a local model directory (made absolute) or a hub id (owner/name); else one line."""
    from sakd.models.presets import PRESETS

    if spec in PRESETS:
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec
    raise ConfigError(
        f"--{role} {spec}: not a preset ({', '.join(PRESETS)}), a model directory or a hub id (owner/name)"
    )
