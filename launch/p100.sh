#!/usr/bin/env bash
# One Tesla P100 (16 GB, sm_60, no bf16): the Huihui-MoE-1B -> SmolLM-135M recipe in fp16 with loss
# scaling, an fp16 teacher, a bitsandbytes 8-bit AdamW and gradient checkpointing.
#
#   launch/p100.sh OUT_DIR [KEY=VALUE ...]
#
# OUT_DIR          the run directory (training.output_dir); an existing run there is resumed.
# KEY=VALUE ...    further sakd overrides, passed through to `sakd distill` after the ones below
#                  (the last one wins), e.g. training.max_steps=2000 training.batch_size=2.
# PYTHON           (env) the interpreter, default .venv/bin/python.
#
# PyTorch must be a CUDA 12.6 build on a P100: the CUDA 12.8+ wheels carry no sm_60 kernels.
#   pip install torch --index-url https://download.pytorch.org/whl/cu126
# `sakd distill` checks this first and stops with that command when the installed build cannot run here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:?usage: launch/p100.sh OUT_DIR [KEY=VALUE ...]}"
shift
exec "$PY" -m accelerate.commands.launch --config_file accelerate_configs/p100_fp16.yaml -m sakd.cli \
    distill --config sakd/recipes/huihui-moe-1b-to-smollm-135m.yaml \
    training.output_dir="$OUT" optimization.optimizer=adamw_8bit training.mixed_precision=fp16 \
    model.teacher_dtype=float16 model.gradient_checkpointing=true "$@"
