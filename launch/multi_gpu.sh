#!/usr/bin/env bash
# One machine, NUM_GPUS GPUs: the Huihui-MoE-1B -> SmolLM-135M recipe under DeepSpeed ZeRO (default)
# or plain DDP.
#
#   launch/multi_gpu.sh NUM_GPUS OUT_DIR [KEY=VALUE ...]
#
# NUM_GPUS         processes to start, one per GPU.
# OUT_DIR          the run directory (training.output_dir); an existing run there is resumed.
# KEY=VALUE ...    further sakd overrides, e.g. training.mixed_precision=bf16 model.teacher_dtype=bfloat16
#                  on Ampere or newer (the recipe is fp16, for P100s).
# ZERO             (env) which ds_configs/ file: 0, 1, 2 (default), 3, 2_offload, 3_offload
#                  -> ds_configs/zero$ZERO.json; "none": plain DDP (accelerate_configs/multi_gpu_ddp.yaml).
#                  The offload configs expect optimization.optimizer=ds_cpu_adam (see ds_configs/README.md).
# LAUNCHER         (env) deepspeed (default): the deepspeed launcher,
#                      deepspeed --num_gpus N --no_local_rank --module sakd.cli distill ... training.deepspeed=...
#                  accelerate: the same run through Accelerate's DeepSpeed integration,
#                      accelerate launch --config_file accelerate_configs/ds_zero2.yaml (ds_zero3.yaml for ZeRO-3)
#                        --deepspeed_config_file ds_configs/zero$ZERO.json --num_processes N -m sakd.cli distill ...
# MASTER_PORT      (env) the rendezvous port on this machine, default 29500 (give each concurrent run its own).
# RECIPE           (env) default sakd/recipes/huihui-moe-1b-to-smollm-135m.yaml.
# PYTHON           (env) the interpreter, default .venv/bin/python.
#
# Either way training.deepspeed names the same JSON, whose "auto" values sakd fills from its own config.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
USAGE="usage: [ZERO=0|1|2|3|2_offload|3_offload|none] [LAUNCHER=deepspeed|accelerate] launch/multi_gpu.sh NUM_GPUS OUT_DIR [KEY=VALUE ...]"
NUM_GPUS="${1:?$USAGE}"
OUT="${2:?$USAGE}"
shift 2
ZERO="${ZERO:-2}"
LAUNCHER="${LAUNCHER:-deepspeed}"
RECIPE="${RECIPE:-sakd/recipes/huihui-moe-1b-to-smollm-135m.yaml}"
PORT="${MASTER_PORT:-29500}"
DISTILL=(distill --config "$RECIPE" training.output_dir="$OUT")

if [[ "$ZERO" == none ]]; then
    exec "$PY" -m accelerate.commands.launch --config_file accelerate_configs/multi_gpu_ddp.yaml \
        --num_processes "$NUM_GPUS" --main_process_port "$PORT" -m sakd.cli "${DISTILL[@]}" "$@"
fi
DS="ds_configs/zero${ZERO}.json"
[[ -f "$DS" ]] || { echo "no $DS; $USAGE" >&2; exit 2; }
case "$LAUNCHER" in
    deepspeed)
        # --no_local_rank: ranks read LOCAL_RANK from the environment; sakd takes no --local_rank argument
        exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "$PORT" --no_local_rank --module \
            sakd.cli "${DISTILL[@]}" training.deepspeed="$DS" "$@"
        ;;
    accelerate)
        ACC=accelerate_configs/ds_zero2.yaml
        [[ "$ZERO" == 3* ]] && ACC=accelerate_configs/ds_zero3.yaml
        exec "$PY" -m accelerate.commands.launch --config_file "$ACC" --deepspeed_config_file "$DS" \
            --num_processes "$NUM_GPUS" --main_process_port "$PORT" -m sakd.cli "${DISTILL[@]}" \
            training.deepspeed="$DS" "$@"
        ;;
    *)
        echo "LAUNCHER must be deepspeed or accelerate, got '$LAUNCHER'" >&2
        exit 2
        ;;
esac
