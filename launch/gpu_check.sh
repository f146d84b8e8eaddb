#!/usr/bin/env bash
# The GPU check: the real-size pair (Huihui-MoE-1.2B teacher, SmolLM-135M student, random init, two
# tokenizers) on one lent GPU, in at most ~8 minutes, one JSON report:
#   - launch/p100.sh's settings (fp16, fp16 teacher, 8-bit AdamW, gradient checkpointing) under a 16 GB cap:
#     fits or not, peak memory against `sakd plan`'s estimate, tokens/s;
#   - bf16 tokens/s and MFU; a torch.compile'd pair; 8-bit and 4-bit teachers; adamw_8bit and paged_adamw_8bit.
#
#   launch/gpu_check.sh [OUT_JSON] [ARGS of `sakd bench gpu` ...]
#
# OUT_JSON  (default gpu_check.json) the report, rewritten after every variant (see `sakd bench gpu --help`).
# ARGS      e.g. --student-tokenizer DIR --teacher-tokenizer DIR (default: generated tokenizers of the real
#           sizes), --budget SECONDS (default 450), --peak-tflops N (MFU on a GPU not in the built-in table),
#           --reduced (tiny models; on a CPU the CUDA variants are listed as skipped: what CI runs).
# PYTHON    (env) the interpreter, default .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-gpu_check.json}"
shift || true
exec "$PY" -m sakd.cli bench gpu --output "$OUT" --recipe sakd/recipes/huihui-moe-1b-to-smollm-135m.yaml "$@"
