"""Benchmark: what distillation buys on your own teacher -> student pair and text.

``sakd bench quality --teacher T --student S --data FILE`` splits FILE three ways (train / validation /
test, whole runs of documents, deterministic), writes the teacher caches once (`sakd cache-teacher`'s
path: topk_tail with each --cache-k, sampled with each --cache-draws, at each temperature), then trains the
student by `sakd distill`'s path in every arm -- CE only, KD with the live teacher, KD from each cache --
for every unique-token budget x epochs, alpha, T and seed. Per budget x epochs and arm the (alpha, T) with
the best mean validation bits per byte is chosen; its test bits per byte (`sakd eval`'s scorer) and the
share of the CE -> teacher gap it closes are reported, with the spread over seeds, wall time per arm and
cache bytes per token. Writes OUT/quality.json, OUT/quality.png and OUT/quality.md; a rerun skips the
runs already in OUT/runs.jsonl. OUT/bench.json records what the split, tokenizer, teacher and caches were
made from (data, --sample-by, --text-field, teacher, --teacher-steps, tokenizers, --vocab-size): a rerun
with another of these stops, asking for a new --output-dir.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sakd.commands import quality_runs as qr
from sakd.commands import quality_setup as qset
from sakd.commands import quality_summary as qs
from sakd.errors import ConfigError

ARMS = ("ce", "live", "topk_tail", "sampled")
# The grid when an option is not given: the full benchmark, and --reduced (tiny, well under a minute).
FULL = dict(
    budgets=[100_000], epochs=[1.0, 2.0, 4.0, 8.0], alphas=[0.5, 1.0], temperatures=[1.0, 2.0], seeds=3,
    cache_k=[16, 64, 256], cache_draws=[16, 64], block_size=128, batch_size=8, learning_rate=3e-3,
    warmup_steps=20, teacher_steps=600, vocab_size=1024, max_eval_tokens=None,
)  # fmt: skip
REDUCED = dict(
    budgets=[1024], epochs=[1.0, 2.0], alphas=[0.5, 1.0], temperatures=[1.0], seeds=1, cache_k=[4, 16],
    cache_draws=[4, 16], block_size=32, batch_size=4, learning_rate=3e-3, warmup_steps=2, teacher_steps=30,
    vocab_size=384, max_eval_tokens=1024,
)  # fmt: skip


def _d(key: str) -> str:
    """The help text's defaults of a grid option."""
    full, reduced = (
        " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in (x if isinstance(x, list) else [x]))
        for x in (FULL[key], REDUCED[key])
    )
    return f"(default: {full}; with --reduced: {reduced})"  # fmt: skip


def _budget(text: str) -> int:
    """A --budgets value: a token count, or ``all`` (0 here: the training split's tokens, known later)."""
    if text == "all":
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count or `all`: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sakd bench quality",
        description=__doc__.split("\n\n", 1)[1],
    )
    a = p.add_argument
    a(
        "--teacher",
        required=True,
        help="teacher: a model directory (e.g. from `sakd assets smollm2 DIR`), a "
        "hub id, or a preset (then pretrained on the training split for --teacher-steps steps first)",
    )
    a("--student", required=True, help="student: a preset (tiny-dense, small-llama-15m, ...) or a directory")
    a("--data", required=True, help="text file (.txt/.jsonl/.parquet), e.g. `sakd assets kjv DIR`'s kjv.txt")
    a(
        "--output-dir",
        default="runs/bench-quality",
        help="where caches, runs, quality.json/.png/.md go (default: runs/bench-quality)",
    )
    a(
        "--sample-by",
        default="line",
        choices=["document", "paragraph", "line"],
        help="what one document of a .txt file is; the split moves whole documents (default: line, as in "
        "`sakd assets kjv`: one chapter per line)",
    )
    a(
        "--text-field",
        default="text",
        help="column of .jsonl/.parquet records holding the text (default: text)",
    )
    a(
        "--tokenizer",
        help="student tokenizer (default: the teacher's; with a preset teacher, a byte-level BPE "
        "of --vocab-size tokens trained on the training split)",
    )
    a("--teacher-tokenizer", help="teacher tokenizer (default: the teacher's directory, else --tokenizer)")
    a(
        "--budgets",
        type=_budget,
        nargs="+",
        help="unique training tokens per run (student tokens, whole blocks), or `all` (the whole training "
        f"split: one pass over it with --epochs 1) {_d('budgets')}",
    )
    a("--epochs", type=float, nargs="+", help=f"passes over the budget's tokens {_d('epochs')}")
    a(
        "--alphas",
        type=float,
        nargs="+",
        help=f"KD weight alpha, chosen on validation {_d('alphas')}",
    )
    a(
        "--temperatures",
        type=float,
        nargs="+",
        help=f"KD temperature T, chosen on validation; one cache per T {_d('temperatures')}",
    )
    a("--seeds", type=int, help=f"seeds per setting, 0..N-1 {_d('seeds')}")
    a("--cache-k", type=int, nargs="*", help=f"k of the topk_tail caches {_d('cache_k')}")
    a("--cache-draws", type=int, nargs="*", help=f"draws of the sampled caches {_d('cache_draws')}")
    a(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="which arms to train: ce (CE only), live (KD with the live teacher), topk_tail and sampled "
        "(KD from those caches) (default: all)",
    )
    a("--block-size", type=int, help=f"tokens per block {_d('block_size')}")
    a("--batch-size", type=int, help=f"blocks per optimizer step {_d('batch_size')}")
    a(
        "--learning-rate",
        type=float,
        help=f"student peak learning rate, cosine {_d('learning_rate')}",
    )
    a("--warmup-steps", type=int, help=f"warm-up steps (at most 1/10 of a run) {_d('warmup_steps')}")
    a(
        "--teacher-steps",
        type=int,
        help=f"pretraining steps of a preset teacher {_d('teacher_steps')}",
    )
    a(
        "--vocab-size",
        type=int,
        help=f"size of the tokenizer trained for a preset teacher {_d('vocab_size')}",
    )
    a(
        "--max-eval-tokens",
        type=int,
        help="score only the first N tokens of each held-out split (default: all; with --reduced: 1024)",
    )
    a(
        "--reduced",
        action="store_true",
        help="a smoke test in well under a minute with tiny presets (e.g. --teacher tiny-moe --student "
        "tiny-dense): the 'with --reduced' values above; options given still win",
    )
    return p  # fmt: skip


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Every grid option: the given value, else the --reduced or full default; checked."""
    base = REDUCED if args.reduced else FULL
    opts = {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in base}
    for key in ("epochs", "alphas", "temperatures"):
        if not opts[key] or min(opts[key]) <= 0 and key != "alphas":
            raise ConfigError(f"--{key} needs positive values, got {opts[key]}")
    if not all(0 <= a <= 1 for a in opts["alphas"]) or opts["seeds"] < 1:
        raise ConfigError("--alphas must lie in [0, 1] and --seeds be at least 1")
    if not all(b == 0 or b >= opts["block_size"] for b in opts["budgets"]):
        raise ConfigError(f"--budgets must be `all` or at least one block ({opts['block_size']} tokens)")
    return opts


def _tokenizers(args: argparse.Namespace, teacher: str, opts: dict[str, Any], split: dict) -> tuple[str, str]:
    """The student's and the teacher's tokenizer specs."""
    from sakd.models.presets import is_preset

    student_tok = args.tokenizer or (None if is_preset(teacher) else teacher)
    if student_tok is None:
        from sakd.commands.demo import train_tokenizer

        out = Path(split["files"]["train"]).parent
        text = out / "train_text.txt"
        text.write_text("\n".join(json.loads(line)["text"] for line in open(split["files"]["train"])))
        tok_dir = out / f"tokenizer-v{opts['vocab_size']}"  # made once: OUT/bench.json fixes its inputs
        if not (tok_dir / "tokenizer.json").is_file():
            train_tokenizer(text, tok_dir, opts["vocab_size"])
        student_tok = str(tok_dir)
    teacher_tok = args.teacher_tokenizer or (student_tok if is_preset(teacher) else teacher)
    return student_tok, teacher_tok


def _grid(opts: dict[str, Any], arms: list[str], caches: dict[str, str]) -> list[qr.Run]:
    """Every run, cell by cell (CE once per seed: it has no alpha or T)."""
    runs = []
    for budget in opts["budgets"]:
        for epochs in opts["epochs"]:
            cell = {"budget": budget, "epochs": epochs}
            for seed in range(opts["seeds"]):
                if "ce" in arms:
                    runs.append(qr.Run("ce", alpha=0.0, temperature=1.0, seed=seed, **cell))
                for alpha in opts["alphas"]:
                    for t in opts["temperatures"]:
                        if "live" in arms:
                            runs.append(qr.Run("kd_live", alpha=alpha, temperature=t, seed=seed, **cell))
                        for name, root in caches.items():
                            if name.endswith(f"_T{t:g}"):
                                arm = name.rsplit("_T", 1)[0]
                                runs.append(
                                    qr.Run(arm, alpha=alpha, temperature=t, seed=seed, cache=root, **cell)
                                )
    return runs  # fmt: skip


def _done_runs(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """The runs a previous invocation finished with the same setup (OUT/runs.jsonl)."""
    return {r["name"]: r for r in qset.read_rows(path) if r.get("setup_key") == key}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns (and writes) the report."""
    t0 = time.perf_counter()
    opts = resolve(args)
    teacher, student = qr.check_model(args.teacher, "teacher"), qr.check_model(args.student, "student")
    out = Path(args.output_dir)
    from sakd.models.presets import is_preset

    qset.check_bench(out, qset.bench_fields(args, teacher, opts, is_preset(teacher)))
    split = qr.split_data(args.data, args.sample_by, args.text_field, out / "data")
    student_tok, teacher_tok = _tokenizers(args, teacher, opts, split)
    setup = qr.Setup(
        teacher, student, student_tok, teacher_tok, split["files"], opts["block_size"], opts["batch_size"],
        opts["learning_rate"], opts["warmup_steps"], out, opts["block_size"] // 2, opts["max_eval_tokens"], args.data,
        args.sample_by, args.text_field, opts["teacher_steps"] if is_preset(teacher) else None,
    )  # fmt: skip
    tokens = {"student": qr.token_count(setup, student_tok), "teacher": qr.token_count(setup, teacher_tok)}
    whole = tokens["student"] // setup.block_size * setup.block_size  # the split's full blocks
    opts["budgets"] = [b or whole for b in opts["budgets"]]
    if max(opts["budgets"]) // setup.block_size * setup.block_size > whole:
        raise ConfigError(
            f"--budgets {max(opts['budgets'])} exceeds the training split's {whole} tokens in whole blocks "
            f"of {setup.block_size} (use a smaller budget, or `all`)"
        )
    pretrain: dict[str, Any] = {"pretrain_seconds": None}
    if is_preset(teacher):
        setup.teacher, pretrain = qr.pretrain_teacher(setup, opts["teacher_steps"])
    scorer = qr.Scorer(setup)
    teacher_scores = scorer.score(setup.teacher, teacher_tok)
    t_blocks = qr.teacher_blocks_for(setup, max(opts["budgets"]), tokens["student"], tokens["teacher"])
    specs = [qr.CacheSpec("topk_tail", k, t) for t in opts["temperatures"] for k in opts["cache_k"] or []]
    specs += [qr.CacheSpec("sampled", n, t) for t in opts["temperatures"] for n in opts["cache_draws"] or []]
    specs = [c for c in specs if c.mode in args.arms]
    caches = [qr.build_cache(setup, c, t_blocks) for c in specs]
    roots = {c.dir_name: row["dir"] for c, row in zip(specs, caches, strict=True)}
    log, rows = out / "runs.jsonl", []
    done = _done_runs(log, qr.setup_key(setup))
    grid = _grid(opts, args.arms, roots)
    for i, run in enumerate(grid):
        row = done.get(run.name)
        if row is None:
            print(f"[bench quality] run {i + 1}/{len(grid)}: {run.name}", flush=True)
            row = qr.train_and_score(setup, run, scorer)
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        rows.append(row)
    bpt = {c.dir_name: row["bytes_per_token"] for c, row in zip(specs, caches, strict=True)}
    results = qs.summarize(rows, teacher_scores["test"]["bpb"], bpt)
    report = {
        "mode": "reduced" if args.reduced else "full",
        "setup_key": qr.setup_key(setup),  # the runs (and teacher scores) of this invocation's setup
        "options": {**opts, "arms": args.arms},
        "setup": {
            "teacher": setup.teacher, "teacher_source": args.teacher, "student": student,
            "tokenizer": student_tok, "teacher_tokenizer": teacher_tok, "data": args.data,
            "sample_by": args.sample_by, "eval_stride": setup.eval_stride,
        },
        "split": {**split, "train_tokens": tokens},
        "teacher": {**teacher_scores, **pretrain},
        "caches": caches,
        "runs": rows,
        "results": results,
        "wall": {**qs.wall_times(rows, caches), "total_seconds": round(time.perf_counter() - t0, 3)},
    }  # fmt: skip
    report["plot"] = str(qs.plot(results, teacher_scores["test"]["bpb"], out / "quality.png"))
    (out / "quality.md").write_text(qs.to_markdown(results, teacher_scores) + "\n")
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``sakd bench quality --teacher T --student S --data FILE [...]``."""
    args = build_parser().parse_args(argv)
    report = run_bench(args)
    print(qs.to_markdown(report["results"], report["teacher"]))
    print(f"wrote {Path(args.output_dir) / 'quality.json'} and {report['plot']}")


if __name__ == "__main__":
    main()
