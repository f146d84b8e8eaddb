"""More runs into a `sakd bench quality` output directory, in a chosen order and without rescoring the
teacher (the slow part of each invocation with a real teacher): same Setup as the bench's, so the rows
carry its setup_key and `benchmarks/quality_merge.py` / a later bench invocation reuse them.
usage: python benchmarks/quality_continue.py OUT TEACHER_DIR STUDENT DATA RUN [RUN...]
  RUN = ARM:SEED with ARM one of ce, live, topk_tail:K, sampled:N
env: BUDGET (90112), EPOCHS (4.5), ALPHA (0.9), T (1), MAX_EVAL (8192); block 128, batch 8, lr 3e-3, warm-up 20
(the bench's defaults). Needs OUT/data from a bench invocation (the split; its --sample-by and --text-field
are read from OUT/bench.json). Runs already in OUT/runs.jsonl with this setup (same setup_key, same student) are
skipped; an OUT/runs.jsonl holding rows of another setup is refused (one line)."""

import json
import os
import sys
from pathlib import Path

from sakd.commands import console

console.setup(debug=False)  # the libraries' import-time warnings, filtered as `sakd` filters them
console.runtime()
from sakd.commands import quality_runs as qr  # noqa: E402
from sakd.commands import quality_setup as qset  # noqa: E402
from sakd.errors import ConfigError  # noqa: E402

if len(sys.argv) < 6:
    sys.exit(__doc__)
out, teacher, student, data = Path(sys.argv[1]), str(Path(sys.argv[2]).resolve()), sys.argv[3], sys.argv[4]
budget, epochs = int(os.environ.get("BUDGET", 90112)), float(os.environ.get("EPOCHS", 4.5))
alpha, temp = float(os.environ.get("ALPHA", 0.9)), float(os.environ.get("T", 1))
files = {s: str(out / "data" / f"{s}.jsonl") for s in qr.SPLITS}
made = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
if made.get("data_sha256") not in (None, qset.file_sha256(data)):
    sys.exit(f"quality_continue: {out} was split from another file than {data} (bench.json's data_sha256)")
if Path(str(made.get("teacher"))).is_dir() and made["teacher"] != teacher:
    sys.exit(f"quality_continue: {out} was made with the teacher {made['teacher']}, not {teacher}")
setup = qr.Setup(
    teacher,
    student,
    teacher,
    teacher,
    files,
    128,
    8,
    3e-3,
    20,
    out,
    64,
    int(os.environ.get("MAX_EVAL", 8192)),
    data,
    made.get("sample_by", "line"),
    made.get("text_field", "text"),
    made.get("teacher_steps"),
)
blocks = -(-budget // setup.block_size)  # one tokenizer for both: the student's blocks
log = out / "runs.jsonl"
try:
    done = qset.rows_to_continue(log, qr.setup_key(setup), student)
except ConfigError as err:
    sys.exit(f"quality_continue: {err}")
scorer = qr.Scorer(setup)
for spec in sys.argv[5:]:
    arm, seed = spec.rsplit(":", 1)
    cache = None
    if arm not in ("ce", "live"):
        mode, size = arm.split(":")
        row = qr.build_cache(setup, qr.CacheSpec(mode, int(size), temp), blocks)
        print(
            f"[continue] cache {row['arm']}: {row['bytes_per_token']:.1f} B/token, {row['seconds']} s",
            flush=True,
        )
        cache, name = row["dir"], row["arm"]
    else:
        name = "ce" if arm == "ce" else "kd_live"
    a, t = (0.0, 1.0) if arm == "ce" else (alpha, temp)
    run = qr.Run(name, budget, epochs, a, t, int(seed), cache=cache)
    if run.name in done:
        continue
    print(f"[continue] {run.name}", flush=True)
    row = qr.train_and_score(setup, run, scorer)
    print(
        f"[continue] {run.name}: test {row['test_bpb']:.4f} val {row['validation_bpb']:.4f} "
        f"train {row['train_seconds']:.0f} s",
        flush=True,
    )
    with log.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
