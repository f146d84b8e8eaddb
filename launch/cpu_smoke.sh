#!/usr/bin/env bash
# CPU smoke run: a tiny MoE teacher (random init) -> tiny dense student, a few steps, through
# `accelerate launch` exactly as a GPU run would go (only the accelerate config differs).
#
#   launch/cpu_smoke.sh [OUT_DIR] [STEPS]
#
# OUT_DIR (default runs/cpu-smoke) receives the corpus, the tokenizer and the run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/cpu-smoke}"
STEPS="${2:-20}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path
from sakd.corpus import write_corpus
from sakd.demo import train_tokenizer
out = Path(sys.argv[1])
corpus = write_corpus(out / "corpus.txt", num_docs=500)
if not (out / "tokenizer" / "tokenizer.json").is_file():
    train_tokenizer(corpus, out / "tokenizer", 512)
PY
"$PY" -m accelerate.commands.launch --config_file accelerate_configs/cpu_single.yaml -m sakd.cli \
    distill --config sakd/recipes/demo.yaml --overwrite \
    model.teacher=tiny-moe model.student=tiny-dense model.tokenizer="$OUT/tokenizer" \
    data.train="$OUT/corpus.txt" data.block_size=64 data.max_eval_blocks=16 \
    training.output_dir="$OUT/run" training.max_steps="$STEPS" training.batch_size=4 \
    training.eval_every=0 training.save_every=0 logging.progress_bar=false
