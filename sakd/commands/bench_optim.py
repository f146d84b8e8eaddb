"""Benchmark: one AdamW step on a real-size student, per PyTorch implementation.

``sakd bench optim`` builds a student preset (random init, default ``smollm-135m``), gives every trainable
parameter a random gradient and times ``optimizer.step()`` on the student's parameter groups
(:func:`sakd.training.optim.param_groups`: no decay on norms and biases) for each implementation of
``torch.optim.AdamW``:

- ``loop``: ``foreach=False`` — one small update per tensor (PyTorch's CPU default before the trainer asked
  for the fused kernel: on the CPU ``foreach`` is not chosen by default);
- ``foreach``: ``foreach=True`` — the multi-tensor path;
- ``fused``: ``fused=True`` — one kernel over all tensors (what :func:`sakd.training.optim.build_optimizer`
  builds for ``optimization.optimizer: adamw``).

Each implementation runs ``warmup`` untimed steps, then ``steps`` timed steps; the median and fastest are
reported, and the ratio of each median to ``fused``'s. The updates are the same (``tests/test_optim.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

IMPLS: dict[str, dict[str, bool]] = {
    "loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def student_groups(preset: str, seed: int = 0) -> list[dict[str, Any]]:
    """The preset's parameter groups with a random gradient on every parameter."""
    from transformers import AutoModelForCausalLM

    from sakd.models.presets import build_preset_config
    from sakd.training.optim import param_groups

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_preset_config(preset))
    groups = param_groups(model, weight_decay=0.01, lr=1e-4)
    for g in groups:
        g.pop("names")
        for p in g["params"]:
            p.grad = torch.randn_like(p) * 1e-3
    return groups


def time_step(groups: list[dict[str, Any]], impl: str, steps: int, warmup: int) -> dict[str, Any]:
    """Median and fastest seconds of ``optimizer.step()`` for one implementation (fresh state)."""
    optimizer = torch.optim.AdamW(groups, lr=1e-4, **IMPLS[impl])
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"impl": impl, "seconds": statistics.median(times), "seconds_min": min(times)}


def run(preset: str, impls: tuple[str, ...], steps: int, warmup: int) -> list[dict[str, Any]]:
    """One row per implementation, each with ``vs_fused`` (its median over fused's) when fused ran."""
    groups = student_groups(preset)
    params = sum(p.numel() for g in groups for p in g["params"])
    rows = [{**time_step(groups, impl, steps, warmup), "params": params} for impl in impls]
    fused = next((r["seconds"] for r in rows if r["impl"] == "fused"), None)
    for r in rows:
        r["vs_fused"] = r["seconds"] / fused if fused else None
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| AdamW | params | step s (median) | fastest s | × fused |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['vs_fused']:.1f}" if r["vs_fused"] is not None else "—"
        lines.append(
            f"| {r['impl']} | {r['params']:,} | {r['seconds']:.3f} | {r['seconds_min']:.3f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``sakd bench optim [--preset smollm-135m] [--steps 5]``."""
    parser = argparse.ArgumentParser(prog="sakd bench optim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm-135m", help="student preset (random init)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of Markdown")
    args = parser.parse_args(argv)
    rows = run(args.preset, tuple(args.impls), args.steps, args.warmup)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
