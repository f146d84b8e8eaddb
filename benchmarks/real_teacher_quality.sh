#!/bin/bash
# Issue 23 (items 2-4): the real SmolLM2-135M-Instruct teacher -> STUDENT on the KJV, data-limited (90,112 unique
# training tokens = the first 704 blocks of 128 of the training split, Genesis to Exodus; 4.5 epochs = 396 steps
# x 8 x 128), alpha 0.9 and T 1 fixed (the demo recipe's). One thread, one run at a time.
# usage: benchmarks/real_teacher_quality.sh SMOL_DIR KJV_TXT OUT [STUDENT]   (SMOL_DIR from `sakd assets smollm2`,
# KJV_TXT from `sakd assets kjv`). Step 1 is `sakd bench quality` itself (split, caches, teacher scores, CE and
# sampled n128 at seed 0); step 2 adds runs in a chosen order without rescoring the teacher; step 3 the table.
set -e
SMOL=$1 KJV=$2 OUT=$3 STUDENT=${4:-tiny-dense}
export OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
sakd bench quality --teacher "$SMOL" --student "$STUDENT" --data "$KJV" --output-dir "$OUT" --budgets 90112 \
  --epochs 4.5 --alphas 0.9 --temperatures 1 --cache-k 64 --cache-draws 128 --max-eval-tokens 8192 \
  --arms ce sampled --seeds 1
python benchmarks/quality_continue.py "$OUT" "$SMOL" "$STUDENT" "$KJV" live:0 ce:1 sampled:128:1 topk_tail:64:0 \
  ce:2 sampled:128:2 topk_tail:64:1 topk_tail:64:2
python benchmarks/quality_merge.py "$OUT"
