#!/usr/bin/env bash
# CPU smoke run: a tiny MoE teacher (random init) -> tiny dense student, a few steps, launched as a GPU
# run would be (only the launcher's configuration differs).
#
#   launch/cpu_smoke.sh [OUT_DIR] [STEPS] [NPROC] [ZERO]
#
# OUT_DIR (default runs/cpu-smoke) receives the corpus, the tokenizer and the run directory (OUT_DIR/run).
# STEPS   (default 20) optimizer steps.
# NPROC   (default 1) processes. 1: `accelerate launch --config_file accelerate_configs/cpu_single.yaml`.
#         2 or more: torchrun (`python -m torch.distributed.run --standalone --nproc_per_node NPROC`), since
#         `accelerate launch` starts a single process for a MULTI_CPU config unless it goes through mpirun.
# ZERO    (default none) 0, 1, 2 or 3: add training.deepspeed=ds_configs/zero$ZERO.json (DeepSpeed on the
#         CPU, fp32). Always started by torchrun, even with NPROC=1 (DeepSpeed needs a process group).
#
# Accelerate 1.15 on the CPU: torchrun gives Accelerate's MULTI_CPU world only with ACCELERATE_USE_CPU=1,
# which is set for plain DDP; it is NOT set with ZERO, because it makes Accelerate drop DeepSpeed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/cpu-smoke}"
STEPS="${2:-20}"
NPROC="${3:-1}"
ZERO="${4:-}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path
from sakd.data.synthetic import write_corpus
from sakd.commands.demo import train_tokenizer
out = Path(sys.argv[1])
corpus = write_corpus(out / "corpus.txt", num_docs=500)
if not (out / "tokenizer" / "tokenizer.json").is_file():
    train_tokenizer(corpus, out / "tokenizer", 512)
PY
ARGS=(
    distill --config sakd/recipes/demo.yaml --overwrite
    model.teacher=tiny-moe model.student=tiny-dense model.tokenizer="$OUT/tokenizer"
    data.train="$OUT/corpus.txt" data.sample_by=line data.block_size=64 data.max_eval_blocks=16
    training.output_dir="$OUT/run" training.max_steps="$STEPS" training.batch_size=4
    training.eval_every=0 training.save_every=0 logging.progress_bar=false
)
if [[ -n "$ZERO" ]]; then
    DS="ds_configs/zero${ZERO}.json"
    [[ -f "$DS" ]] || { echo "ZERO must be 0, 1, 2 or 3 (no $DS)" >&2; exit 2; }
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m sakd.cli \
        "${ARGS[@]}" training.deepspeed="$DS"
elif [[ "$NPROC" -gt 1 ]]; then
    ACCELERATE_USE_CPU=1 exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
        -m sakd.cli "${ARGS[@]}"
else
    exec "$PY" -m accelerate.commands.launch --config_file accelerate_configs/cpu_single.yaml -m sakd.cli \
        "${ARGS[@]}"
fi
