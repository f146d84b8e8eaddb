"""Benchmark: naive (materialized ``[N, V]`` logits) vs fused chunked distillation loss, fwd+bwd.

Run ``python -m sakd.commands.bench_losses`` (``--help`` for options). Every measurement runs in a fresh
subprocess: inputs are created in place, the process's resident-set high-water mark is reset
(``/proc/self/clear_refs``) after ``malloc_trim``, and the peak *extra* memory is the high-water
mark of the loss's forward + backward minus the resident set before it. Both paths produce the
same gradients (including the ``[Vs, Hs]`` head-weight gradient, which therefore counts in both).
Time is the fastest of ``repeats`` timed fwd+bwd runs after one warm-up run (the minimum is the
least disturbed by other processes on a shared machine).

Cases (the shapes of the seed recipe: SmolLM-135M student, Huihui-MoE-1.2B teacher):

- ``same_vocab``: teacher hidden 1024 with the student's 49,152-token vocabulary.
- ``cross_vocab``: teacher hidden 1024 and the real 151,936-token vocabulary; the student is
  mapped onto it with a dummy identity-prefix vocab map (student id v → teacher id v; the
  teacher is renormalized over those 49,152 ids), so the naive path materializes both logits
  and projects them (:func:`project_to_shared_support`).
- ``cross_many_to_one``: the same sizes through a many-to-one map shaped like the real pair's
  (:func:`sakd.align.vocab.first_piece_map` of Qwen onto SmolLM2: every teacher token to the student token
  its text begins with): 95 % of the teacher ids spread over 90 % of the student ids, the rest unmapped on
  both sides (a shared tail bucket); the naive path projects with :func:`project_many_to_one`.

``--chunk-sizes`` takes numbers and ``auto`` (the default: :func:`sakd.losses.auto_chunk_size`);
``--impls autograd`` adds rows of the fused chunk loop with autograd on each chunk (the fallback path of the
combinations without closed form, and what the vocab-mapped and sparse paths paid before them).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from sakd.losses import fused_linear_divergence, project_to_shared_support, resolve_chunk_size
from sakd.losses.vocab_map import project_many_to_one


@dataclass(frozen=True)
class Case:
    """One benchmark shape."""

    name: str
    n_tokens: int = 2048
    student_hidden: int = 576
    student_vocab: int = 49_152
    teacher_hidden: int = 1024
    teacher_vocab: int = 49_152
    temperature: float = 2.0
    many_to_one: bool = False


CASES = {
    "same_vocab": Case("same_vocab"),
    "cross_vocab": Case("cross_vocab", teacher_vocab=151_936),
    "cross_many_to_one": Case("cross_many_to_one", teacher_vocab=151_936, many_to_one=True),
}


def many_to_one_map(teacher_vocab: int, student_vocab: int) -> torch.Tensor:
    """``[Vt]`` student id per teacher id: 95 % of the teacher ids over 90 % of the student ids (a fixed
    stride scatters them), the rest -1."""
    ids = torch.arange(teacher_vocab)
    receivers = int(0.9 * student_vocab)
    return torch.where(ids < int(0.95 * teacher_vocab), (ids * 7919) % receivers, -1)


def _inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs created in place (no temporaries that would inflate the baseline)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "s_hidden": torch.empty(case.n_tokens, case.student_hidden).normal_(generator=gen),
        "s_weight": torch.empty(case.student_vocab, case.student_hidden).normal_(0, 0.05, generator=gen),
        "t_hidden": torch.empty(case.n_tokens, case.teacher_hidden).normal_(generator=gen),
        "t_weight": torch.empty(case.teacher_vocab, case.teacher_hidden).normal_(0, 0.05, generator=gen),
    }
    inputs["s_hidden"].requires_grad_()
    inputs["s_weight"].requires_grad_()
    if case.many_to_one:
        inputs["teacher_to_student"] = many_to_one_map(case.teacher_vocab, case.student_vocab)
    elif case.teacher_vocab != case.student_vocab:
        inputs["vocab_map"] = torch.arange(case.student_vocab)
    return inputs


def _naive_step(case: Case, x: dict[str, torch.Tensor]) -> float:
    """Materialize both logits, forward KL with ``F.kl_div``, backward."""
    student_logprobs = F.log_softmax(x["s_hidden"] @ x["s_weight"].T / case.temperature, dim=-1)
    with torch.no_grad():
        teacher_logprobs = F.log_softmax(x["t_hidden"] @ x["t_weight"].T / case.temperature, dim=-1)
    if "vocab_map" in x:
        student_logprobs, teacher_logprobs = project_to_shared_support(
            student_logprobs, teacher_logprobs, x["vocab_map"]
        )
    if "teacher_to_student" in x:
        student_logprobs, teacher_logprobs = project_many_to_one(
            student_logprobs, teacher_logprobs, x["teacher_to_student"]
        )
    loss = F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="batchmean")
    loss = loss * case.temperature**2
    loss.backward()
    return loss.item()


def _fused_step(case: Case, x: dict[str, torch.Tensor], chunk_size: int | str) -> float:
    out = fused_linear_divergence(
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        "fkl",
        temperature=case.temperature,
        chunk_size=chunk_size,
        vocab_map=x.get("vocab_map"),
        teacher_to_student=x.get("teacher_to_student"),
    )
    out.loss.backward()
    return out.loss.item()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _measure_here(case: Case, impl: str, chunk_size: int | str, repeats: int) -> dict:
    """Measure one implementation in this process (called in a fresh subprocess)."""
    if impl == "autograd":  # the fused loop with autograd on each chunk: the fallback path, and the old one
        from sakd.losses.chunk_loop import ChunkPlan

        ChunkPlan.closed_form = property(lambda self: False)
    x = _inputs(case)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident set
    times, loss = [], float("nan")
    for i in range(repeats + 1):
        x["s_hidden"].grad = x["s_weight"].grad = None
        start = time.perf_counter()
        loss = _naive_step(case, x) if impl == "naive" else _fused_step(case, x, chunk_size)
        if i > 0:
            times.append(time.perf_counter() - start)
    return {
        "case": case.name,
        "impl": impl,
        "chunk_size": chunk_size if impl != "naive" else None,
        "chunk_rows": resolve_chunk_size(
            chunk_size,
            case.n_tokens,
            (case.student_vocab, case.teacher_vocab),
            (case.student_hidden, case.teacher_hidden),
        )
        if impl != "naive"
        else None,
        "loss": loss,
        "time_s": min(times),
        "peak_extra_mib": (_rss_kib("VmHWM") - baseline) / 1024,
    }


def _measure(case: Case, impl: str, chunk_size: int | str, repeats: int) -> dict:
    """Run :func:`_measure_here` in a fresh interpreter and parse its JSON line."""
    spec = json.dumps({"case": asdict(case), "impl": impl, "chunk_size": chunk_size, "repeats": repeats})
    done = subprocess.run(
        [sys.executable, "-m", "sakd.commands.bench_losses", "--worker", spec],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    cases: tuple[str, ...] = ("same_vocab", "cross_vocab"),
    chunk_sizes: tuple[int | str, ...] = ("auto",),
    repeats: int = 3,
    n_tokens: int = 2048,
    impls: tuple[str, ...] = ("fused",),
) -> list[dict]:
    """Measure naive vs fused for each case and chunk size; returns one row per measurement.

    ``impls``: ``fused`` (closed-form gradients where they exist) and/or ``autograd`` (the same chunk loop
    with autograd on each chunk: what the fallback combinations pay, and what every vocab-mapped and sparse
    path paid before the closed forms). Their rows carry ``mem_vs_naive``, ``time_vs_naive`` and
    ``loss_rel_diff`` against the naive row of the same case.
    """
    rows = []
    for name in cases:
        case = Case(**{**asdict(CASES[name]), "n_tokens": n_tokens})
        naive = _measure(case, "naive", 0, repeats)
        rows.append(naive)
        for impl in impls:
            for chunk_size in chunk_sizes:
                fused = _measure(case, impl, chunk_size, repeats)
                fused["mem_vs_naive"] = fused["peak_extra_mib"] / naive["peak_extra_mib"]
                fused["time_vs_naive"] = fused["time_s"] / naive["time_s"]
                fused["loss_rel_diff"] = abs(fused["loss"] - naive["loss"]) / abs(naive["loss"])
                rows.append(fused)
    return rows


def _chunk_text(row: dict) -> str:
    if row["impl"] == "naive":
        return "—"
    return f"auto → {row['chunk_rows']}" if row["chunk_size"] == "auto" else str(row["chunk_rows"])


def to_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| case | impl | chunk | loss | time fwd+bwd (s) | peak extra (MiB) | mem / naive | time / naive | loss rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratios = ("—", "—", "—")
        if r["impl"] != "naive":
            ratios = (f"{r['mem_vs_naive']:.3f}", f"{r['time_vs_naive']:.2f}", f"{r['loss_rel_diff']:.1e}")
        lines.append(
            f"| {r['case']} | {r['impl']} | {_chunk_text(r)} | {r['loss']:.6f} | {r['time_s']:.2f} "
            f"| {r['peak_extra_mib']:.0f} | " + " | ".join(ratios) + " |"
        )
    return "\n".join(lines)


def _chunk_arg(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``python -m sakd.commands.bench_losses [--chunk-sizes 128 256] [--cases ...]``."""
    parser = argparse.ArgumentParser(prog="sakd bench losses", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--chunk-sizes", nargs="+", type=_chunk_arg, default=["auto"], help="numbers or auto (the default)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up run")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument(
        "--impls", nargs="+", default=["fused"], choices=["fused", "autograd"], help="see run()'s docstring"
    )
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of Markdown")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(
            json.dumps(_measure_here(Case(**spec["case"]), spec["impl"], spec["chunk_size"], spec["repeats"]))
        )
        return
    rows = run(tuple(args.cases), tuple(args.chunk_sizes), args.repeats, args.tokens, tuple(args.impls))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
