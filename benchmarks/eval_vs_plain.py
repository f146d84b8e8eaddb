#!/usr/bin/env python3
"""`sakd eval` next to a plain-transformers script (benchmarks/plain_ppl.py) on the same held-out text,
for each ``sample_by`` mode and both scoring methods; they must agree within rounding.

    python benchmarks/eval_vs_plain.py MODEL_DIR TEXT_FILE [--tail-chars 50000] [--max-length 1024]
        [--stride 512] [--modes document paragraph line] [--wrap COLS] [--blocked-only] [--out DIR]

The held-out text is the last ``--tail-chars`` characters of TEXT_FILE, advanced to the next paragraph
start (so it begins at a paragraph), written to ``DIR/heldout.txt``. With ``--wrap COLS`` each paragraph is
hard-wrapped at COLS columns first (``textwrap.fill``), as ordinary prose files are: the text that a
`line` reading turns into one document per line. Each number comes from its own
process (``python -m sakd.cli eval ...`` and ``python benchmarks/plain_ppl.py ...``); the table and
``DIR/results.json`` hold both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tail_text(text: str, n_chars: int) -> str:
    """The last ``n_chars`` characters, starting at the next paragraph start."""
    if n_chars <= 0 or n_chars >= len(text):
        return text
    start = text.find("\n\n", len(text) - n_chars)
    if start == -1:
        return text[len(text) - n_chars :]
    while start < len(text) and text[start] == "\n":
        start += 1
    return text[start:]


def _json_run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("text_file")
    ap.add_argument("--tail-chars", type=int, default=50_000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--modes", nargs="+", default=["document", "paragraph", "line"])
    ap.add_argument("--wrap", type=int, default=None, help="hard-wrap each paragraph at this many columns")
    ap.add_argument("--blocked-only", action="store_true", help="skip the strided runs")
    ap.add_argument("--out", default="runs/eval_vs_plain")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held = out / "heldout.txt"
    text = tail_text(Path(args.text_file).read_text(encoding="utf-8"), args.tail_chars)
    if args.wrap:
        text = "\n\n".join(textwrap.fill(p, args.wrap) for p in text.split("\n\n") if p.strip()) + "\n"
    held.write_text(text, encoding="utf-8")
    rows = []
    for mode in args.modes:
        for stride in (None,) if args.blocked_only else (None, args.stride):
            extra = [] if stride is None else ["--stride", str(stride)]
            sakd = _json_run(
                [sys.executable, "-m", "sakd.cli", "eval", args.model_dir, "--data", str(held), "--sample-by", mode,
                 "--block-size", str(args.max_length), "--batch-size", "4", *extra]
            )  # fmt: skip
            plain = _json_run(
                [sys.executable, str(HERE / "plain_ppl.py"), args.model_dir, str(held), "--sample-by", mode,
                 "--max-length", str(args.max_length), *extra]
            )  # fmt: skip
            rows.append({"sample_by": mode, "sakd": sakd, "plain": plain})
            print(json.dumps(rows[-1]), flush=True)
    old = None
    if (
        args.wrap and "line" in args.modes
    ):  # what sakd did before issue 17: one line = one document, EOS scored
        old = _json_run(
            [sys.executable, str(HERE / "plain_ppl.py"), args.model_dir, str(held), "--sample-by", "line",
             "--max-length", str(args.max_length), "--score-eos"]
        )  # fmt: skip
        print(json.dumps({"old_default": old}), flush=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "old_default": old}, indent=1))
    print(f"\nheld-out text: {held} ({held.stat().st_size:,} bytes)\n")
    print(
        "| sample_by | documents | method | tokens scored | bytes scored | sakd ppl | plain ppl | sakd bpb | plain bpb |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, p = r["sakd"], r["plain"]
        assert (s["tokens"], s["bytes"], s["method"]) == (p["tokens"], p["bytes"], p["method"]), r
        print(
            f"| {r['sample_by']} | {s['documents']} | {s['method']} ({s['window']}/{s['stride']}) | {s['tokens']:,} "
            f"| {s['bytes']:,} | {s['ppl']:.4f} | {p['ppl']:.4f} | {s['bpb']:.5f} | {p['bpb']:.5f} |"
        )
    if old:
        print(
            f"| line, EOS scored (before issue 17) | {old['documents']} | {old['method']} | {old['tokens']:,} "
            f"| {old['bytes']:,} | -- | {old['ppl']:.4f} | -- | {old['bpb']:.5f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
