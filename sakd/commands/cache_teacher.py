"""``sakd cache-teacher``: write an offline teacher cache for a recipe, or verify one.

    sakd cache-teacher --config RECIPE --output DIR [KEY=VALUE ...] [--overwrite]
    sakd cache-teacher --verify DIR

Runs under any launcher (one process, ``accelerate launch``, ``deepspeed``, ``torchrun``): each rank writes
its own shards. The library side is :mod:`sakd.teacher.cache`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sakd.errors import DataError

HELP = """Run the frozen teacher once over the recipe's training documents and store its sparse signal
(distillation.cache.*: mode topk | topk_tail | sampled, top_k, num_samples, temperature, values_dtype,
router) in safetensors shards with a manifest. Train from it with distillation.teacher_cache=DIR: the
teacher is then never loaded, and students with other tokenizers can use the same cache. An interrupted
run resumes when rerun with the same arguments (finished shards are kept)."""


def register(subparsers: Any) -> None:
    """Add the ``cache-teacher`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "cache-teacher", help="write (or --verify) an offline teacher cache", description=HELP
    )
    p.add_argument(
        "--config", metavar="RECIPE", help="YAML/JSON recipe (its teacher, data and distillation.cache)"
    )
    p.add_argument("--output", metavar="DIR", help="cache directory to write (or resume)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. distillation.cache.mode=sampled",
    )
    p.add_argument("--overwrite", action="store_true", help="replace whatever DIR holds")
    p.add_argument(
        "--verify", metavar="DIR", help="check every shard of the cache at DIR against its manifest"
    )
    p.set_defaults(func=run)


def _verify(root: str) -> int:
    from sakd.teacher.cache.verify import verify_cache

    manifest, problems = verify_cache(root)
    if problems:
        for problem in problems:
            print(f"sakd: error: {root}: {problem}", file=sys.stderr)
        print(
            f"sakd: {len(problems)} of {len(manifest['shards'])} shards fail verification; regenerate them "
            f"(`sakd cache-teacher --config RECIPE --output {root}` rewrites what is missing once you delete "
            "the bad shards and manifest.json)",
            file=sys.stderr,
        )
        return 1
    sig = manifest["signal"]
    print(
        f"{root}: ok -- {len(manifest['shards'])} shards, {manifest['layout']['positions']} positions, mode "
        f"{sig['mode']}, {manifest['totals']['bytes_per_token']} bytes/token"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.verify:
        if args.config or args.output:
            raise DataError("--verify DIR takes no --config/--output")
        return _verify(args.verify)
    if not (args.config and args.output):
        raise DataError("sakd cache-teacher needs --config RECIPE and --output DIR (or --verify DIR)")
    from sakd.commands.console import runtime
    from sakd.config import load_config
    from sakd.config.data_schema import check_chat

    cfg, notes = load_config(args.config, args.overrides)  # a bad recipe fails before torch is imported
    check_chat(cfg, caching=True)
    runtime()

    for note in notes:
        print(f"sakd: note: {note}", file=sys.stderr)
    summary = write_cache(cfg, args.output, overwrite=args.overwrite)
    if summary is not None:
        print(json.dumps(summary, indent=1))
    return 0


def write_cache(cfg: Any, output: str, *, overwrite: bool = False) -> dict[str, Any] | None:
    """Write (or finish) the teacher cache of a loaded recipe at ``output`` -- the path of `sakd cache-teacher`
    (and of `sakd bench quality`). Returns the summary on the main process, None on the others."""
    from sakd.teacher.cache.generate import generate_cache
    from sakd.training.distributed import build_accelerator, check_cuda_arch

    check_cuda_arch()
    accelerator = build_accelerator(cfg)
    result = generate_cache(cfg, output, accelerator, overwrite=overwrite)
    summary = None
    if accelerator.is_main_process:
        seconds, computed = result["seconds"], result["computed_positions"]
        summary = {
            "output": output,
            "mode": result["signal"]["mode"],
            "blocks": result["layout"]["blocks"],
            "positions": result["layout"]["positions"],
            "shards": len(result["shards"]),
            "bytes": result["totals"]["bytes"],
            "bytes_per_token": result["totals"]["bytes_per_token"],
            "computed_positions": computed,
            "computed_per_rank": result["per_rank"],
            "seconds": seconds,
            "tokens_per_s": round(computed / seconds, 1) if seconds else None,
        }
        for key in (
            "stored_positions",
            "bytes_all_positions",
            "bytes_saved",
        ):  # conversations: KD positions only
            if key in result["totals"]:
                summary[key] = result["totals"][key]
    # Trackers only: end_training() would also destroy the process group right after the last barrier, which
    # can reset a peer's connection (gloo); `sakd`'s main() leaves the group with every rank at exit.
    for tracker in accelerator.trackers:
        tracker.finish()
    return summary
