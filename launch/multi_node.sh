#!/usr/bin/env bash
# Several machines: the Huihui-MoE-1B -> SmolLM-135M recipe under DeepSpeed ZeRO, started ONCE, on the
# first machine, by the deepspeed launcher, which reaches the others over ssh (pdsh).
#
#   launch/multi_node.sh HOSTFILE OUT_DIR [KEY=VALUE ...]
#
# HOSTFILE         one line per machine, "HOSTNAME slots=GPUS" (see launch/hostfile.example).
# OUT_DIR          the run directory (training.output_dir), on storage every machine shares (checkpoints
#                  are written by all ranks under ZeRO); an existing run there is resumed.
# KEY=VALUE ...    further sakd overrides.
# ZERO             (env) 0, 1, 2 (default), 3, 2_offload, 3_offload -> ds_configs/zero$ZERO.json.
# MASTER_ADDR      (env) the first machine's address as the others reach it (default: the launcher's
#                  guess from `hostname -I`). MASTER_PORT (env) default 29500.
# RECIPE, PYTHON   (env) as in launch/multi_gpu.sh.
#
# Needs: passwordless ssh from the first machine to all (itself included) and pdsh installed there; this
# repository, its .venv and the data at the same path on every machine. Environment variables the ranks
# need (NCCL_SOCKET_IFNAME, HF_HOME, ...) go in a .deepspeed_env file (KEY=VALUE lines) in this directory
# or in $HOME. Without ssh: run `accelerate launch --config_file accelerate_configs/multi_node.yaml ...` on
# every machine instead (see the comments in that file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
USAGE="usage: [ZERO=2] [MASTER_ADDR=IP] launch/multi_node.sh HOSTFILE OUT_DIR [KEY=VALUE ...]"
HOSTFILE="${1:?$USAGE}"
OUT="${2:?$USAGE}"
shift 2
[[ -f "$HOSTFILE" ]] || { echo "no hostfile $HOSTFILE; $USAGE" >&2; exit 2; }
ZERO="${ZERO:-2}"
DS="ds_configs/zero${ZERO}.json"
[[ -f "$DS" ]] || { echo "no $DS; $USAGE" >&2; exit 2; }
RECIPE="${RECIPE:-sakd/recipes/huihui-moe-1b-to-smollm-135m.yaml}"
ADDR=()
[[ -n "${MASTER_ADDR:-}" ]] && ADDR=(--master_addr "$MASTER_ADDR")
exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" "${ADDR[@]}" \
    --master_port "${MASTER_PORT:-29500}" --no_local_rank --module sakd.cli \
    distill --config "$RECIPE" training.output_dir="$OUT" training.deepspeed="$DS" "$@"
