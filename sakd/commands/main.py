"""The `sakd` command.  Entry points stay thin: each subcommand parses, calls the library, prints.

Every user error is one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable

from sakd.commands import console
from sakd.errors import SakdError

EXIT_USAGE = 2
EXIT_FAILURE = 1


def _cmd_distill(args: argparse.Namespace) -> int:
    from sakd.config import load_config

    cfg, notes = load_config(args.config, args.overrides)  # a bad recipe fails before torch is imported
    for note in notes:
        print(f"sakd: note: {note}", file=sys.stderr)
    console.runtime()
    from sakd.training.stop_signals import TrainingStopped
    from sakd.training.trainer import Distiller

    try:
        distiller = Distiller(cfg, resume=args.resume, overwrite=args.overwrite)
        summary = distiller.train()
    except TrainingStopped as e:  # SIGTERM/SIGINT: checkpointed and resumable, but not finished
        print(f"sakd: {e}", file=sys.stderr)
        return e.exit_code
    if distiller.accelerator.is_main_process:  # one summary per run, not one per process
        print(json.dumps(summary, indent=1))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    console.runtime()
    from sakd.commands.demo import demo_line, run_demo
    from sakd.training.stop_signals import TrainingStopped

    try:
        summary = run_demo(args.output_dir, args.data, sample_by=args.sample_by)
    except TrainingStopped as e:  # as `sakd distill`: a stop is a stop, and the next demo picks it up
        print(f"sakd: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(summary, indent=1))
    print(demo_line(summary))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    console.runtime()
    from sakd.training.export import export_run

    out = export_run(args.run_dir, args.output, step=args.step, raw=args.raw, adapter=args.adapter)
    print(f"exported student to {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    console.runtime()
    importlib.import_module(f"sakd.commands.bench_{args.suite}").main(args.bench_args)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    console.runtime()
    from sakd.commands.report import draw

    print(f"wrote {draw(args.run_dir, args.output)}")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from sakd.config.reference import reference_markdown

    print(reference_markdown(), end="")
    return 0


def _add_distill(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "distill",
        help="train a student; writes a run directory",
        description="Train a student from a recipe. The run directory (training.output_dir) gets "
        "config.yaml, metrics.jsonl, checkpoints/, final/ and summary.json.",
    )
    d.add_argument("--config", required=True, help="recipe file (YAML or JSON)")
    d.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides, e.g. training.max_steps=100 distillation.loss.temperature=2",
    )
    d.add_argument(
        "--resume",
        default="auto",
        help="auto (newest complete checkpoint in the run directory), none, or a checkpoint path",
    )
    d.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    d.set_defaults(func=_cmd_distill)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sakd",
        description="Student-Aware Knowledge Distillation: distill a (MoE) teacher LM into a small student.",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks and library logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_distill(sub)

    m = sub.add_parser(
        "demo",
        help="offline end-to-end demo on tiny models (about 2 minutes on 2 CPU cores, after the install)",
        description="Generate a corpus, train the student's and the teacher's tokenizers on the teacher's "
        "training documents, pretrain a tiny MoE teacher (cached), "
        "distill a tiny dense student from a few of its documents and train a CE-only baseline (3 seeds), "
        "report bits per byte and the share of the gap KD closed.",
    )
    m.add_argument("--data", help="use this local text file instead of the generated corpus")
    m.add_argument(
        "--sample-by",
        choices=["document", "paragraph", "line"],
        help="what one document of --data is (default: document, as data.sample_by; the generated "
        "corpus is one document per line)",
    )
    m.add_argument(
        "--output-dir", default="runs/demo", help="where the demo writes its runs (default: runs/demo)"
    )
    m.set_defaults(func=_cmd_demo)

    e = sub.add_parser(
        "export", help="export a run's student as a Hugging Face directory (model.safetensors)"
    )
    e.add_argument("run_dir", help="a sakd run directory")
    e.add_argument("--output", required=True, help="directory to write")
    e.add_argument("--step", type=int, help="export this checkpoint step (default: newest complete)")
    e.add_argument(
        "--raw", action="store_true", help="export the trained weights, not the EMA (runs with training.ema)"
    )
    e.add_argument(
        "--adapter",
        action="store_true",
        help="PEFT students (model.peft): write the adapter alone (adapter_config.json, adapter_model.safetensors) "
        "instead of the model with the adapter merged",
    )
    e.set_defaults(func=_cmd_export)

    from sakd.commands import evaluate as eval_cli

    eval_cli.register(sub)

    b = sub.add_parser(
        "bench",
        help="benchmarks (results and commands in BENCHMARKS.md)",
        description="losses: naive vs fused distillation loss, peak memory and time; step: one KD step of "
        "the real-size pair against its parts (teacher forward, student forward+backward), the overhead "
        "ratio; optim: one AdamW step of a real-size student per PyTorch implementation; gpu: the GPU "
        "check (fp16 under 16 GB, bf16 MFU, quantized teachers, 8-bit optimizers, torch.compile), one JSON; "
        "quality: CE vs KD (live, from caches) on your pair and text: held-out bpb, share of the gap closed.",
    )
    b.add_argument("suite", choices=["losses", "step", "optim", "gpu", "quality"], help="which benchmark")
    b.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="arguments of the benchmark (see --help after the suite)"
    )
    b.set_defaults(func=_cmd_bench)

    rp = sub.add_parser("report", help="draw a run's metric curves (metrics.jsonl) to a PNG")
    rp.add_argument("run_dir", help="a sakd run directory")
    rp.add_argument("--output", help="PNG to write (default: RUN_DIR/report.png)")
    rp.set_defaults(func=_cmd_report)

    from sakd.commands import assets, cache_teacher
    from sakd.commands import plan as plan_cli

    plan_cli.register(sub)
    cache_teacher.register(sub)
    assets.register(sub)

    r = sub.add_parser(
        "config-reference", help="print every config key with its default and meaning (Markdown)"
    )
    r.set_defaults(func=_cmd_config_reference)
    return p


# Every layer raises its own SakdError subclass (sakd.errors); library functions called directly with bad
# arguments raise ValueError; a missing or unreadable path surfaces as FileNotFoundError / PermissionError.
USER_ERRORS = (SakdError, FileNotFoundError, PermissionError, ValueError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``key=value`` overrides may sit anywhere among the options
    (``--config R a=1 --overwrite b=2``), anything else unknown is a usage error (exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.setup(args.debug)
    func: Callable[[argparse.Namespace], int] = args.func
    if args.debug:
        return _leaving(func(args))
    try:
        return _leaving(func(args))
    except KeyboardInterrupt:
        print("sakd: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        print(f"sakd: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # an unexpected failure: still one line, the traceback is behind --debug
        if console.is_out_of_memory(e):
            print(
                "sakd: error: out of memory; lower training.batch_size (raise gradient_accumulation_steps to "
                "keep the global batch), set model.gradient_checkpointing=true, or lower data.block_size",
                file=sys.stderr,
            )
        else:
            print(
                f"sakd: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
                "traceback)",
                file=sys.stderr,
            )
    return EXIT_FAILURE


def _leaving(code: int) -> int:
    """After a command that succeeded, or stopped on a signal (143, 130: every rank agrees on the stop step and
    checkpoints it together), on every rank of a launch, the ranks leave the process group together (a rank
    that exits with it alive can abort at exit and fail the launch, or turn a stop's 143 into SIGABRT; see
    leave_process_group)."""
    dist = sys.modules.get("torch.distributed")  # loaded only by a command that imported torch
    together = code in (0, 128 + signal.SIGTERM, 128 + signal.SIGINT)
    if together and dist is not None and dist.is_available() and dist.is_initialized():
        from sakd.training.distributed import leave_process_group

        leave_process_group()
    return code


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
