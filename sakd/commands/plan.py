"""`sakd plan`: the command around :mod:`sakd.planner.estimate`'s estimator -- arguments, the table, the
recommendation and the overrides that select it. This module holds the arguments only (``sakd --help`` and
argument errors import no torch); :mod:`sakd.commands.plan_table` does the estimate."""

from __future__ import annotations

import argparse
import re
from typing import Any

from sakd.errors import ConfigError

DEFAULT_MICRO_BATCHES = (1, 2, 4, 8, 16)


def parse_memory(text: str) -> int:
    """``16GB`` / ``16GiB`` / ``80G`` / ``16000MB`` / a plain byte count -> bytes. GB, MB and G are
    decimal (10⁹, 10⁶), GiB and MiB binary: the decimal reading of a card's "16 GB" is the safe side
    (what a 16 GB card leaves usable is a little under 16 GiB)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 10**3, "m": 10**6}
    units |= {"g": 10**9, "t": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory must look like 16GB, 16GiB, 80G or 16000MB; got {text!r}")
    return int(float(match.group(1)) * units[match.group(2).lower()])


DEFAULT_HEADROOM = 0.1
"""Share of the GPU memory kept free for the estimate's error: it matched measured CPU peaks within
about 5 % (tests/test_plan.py); GPU kernels' workspaces and fragmentation vary more."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 0.9], got {text!r}") from None
    if not 0 <= value <= 0.9:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 0.9], got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def register(subparsers: Any) -> None:
    """Add the ``plan`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "plan",
        help="estimate per-GPU memory of a recipe and recommend the fastest ZeRO/offload/checkpointing setup",
        description="Estimate per-GPU memory (weights, gradients, optimizer, activations, loss) of a recipe "
        "for each ZeRO stage / offload / optimizer / checkpointing / micro-batch choice, and recommend the "
        "fastest one that fits. No weights are loaded.",
    )
    p.add_argument("--config", required=True, metavar="RECIPE", help="YAML/JSON recipe")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. training.batch_size=4"
    )
    p.add_argument("--gpu-memory", required=True, help="memory per GPU: 16GB, 16GiB, 80G, 16000MB")
    p.add_argument(
        "--num-gpus", type=_positive, default=1, help="GPUs (processes) sharing the work (default 1)"
    )
    p.add_argument(
        "--micro-batches",
        type=_positive,
        nargs="+",
        default=list(DEFAULT_MICRO_BATCHES),
        metavar="B",
        help="micro-batch sizes to try (default: 1 2 4 8 16)",
    )
    p.add_argument("--student-vocab", type=_positive, help="student vocabulary size (default: its config's)")
    p.add_argument("--teacher-vocab", type=_positive, help="teacher vocabulary size (default: its config's)")
    p.add_argument(
        "--headroom",
        type=_fraction,
        default=DEFAULT_HEADROOM,
        help=f"share of the GPU memory a plan must leave free (default {DEFAULT_HEADROOM})",
    )
    p.add_argument("--top", type=_positive, default=3, help="fitting plans to show (default 3)")
    p.add_argument("--json", action="store_true", help="print every candidate as JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Estimate every candidate for the recipe, print the fitting ones and the recommendation.

    Returns 0 when some setup fits, 1 (one line on stderr) when none does.
    """
    memory = parse_memory(args.gpu_memory)
    budget = int(memory * (1 - args.headroom))
    from sakd.config import load_config

    cfg, _notes = load_config(args.config, args.overrides)  # a bad recipe fails before torch is imported
    from sakd.commands.console import runtime

    runtime()
    from sakd.commands.plan_table import plan_and_print

    return plan_and_print(args, cfg, memory, budget)
