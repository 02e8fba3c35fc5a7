#!/usr/bin/env bash
# Launch NeoLLM training under torchrun, in torchtitan's run_train.sh convention.
#
#   ./run_train.sh --job.config_file train_configs/neollm_135m.toml     # 1 GPU (or the CPU)
#   NGPU=8 ./run_train.sh --job.config_file train_configs/neollm_135m.toml
#   CONFIG_FILE=train_configs/debug.toml ./run_train.sh --training.steps 20
#
# Environment: NGPU (processes on this node, default 1), CONFIG_FILE (used when no
# --job.config_file is given; default train_configs/debug.toml), LOG_RANK (ranks whose output is
# shown, default 0), TRAIN_MODULE (default neollm.train), PYTHON (default python3),
# NEOLLM_SKIP_PREFLIGHT=1 (skip the configuration check that runs before torchrun), NEOLLM_COMPILE_CACHE
# (compile and autotune caches, default .cache/compile in this folder; "off" for torch's defaults;
# neollm/compile_cache.py).
# Several nodes (see docs/running.md, scripts/slurm_train.sh): NNODES (default 1), MASTER_ADDR and
# MASTER_PORT (the c10d rendezvous endpoint, default port 29500), RDZV_ID (job id shared by all
# nodes, default neollm), NODE_RANK (optional: c10d assigns ranks itself). Run the same command on
# every node. With NNODES unset or 1 and no MASTER_ADDR, a single node as before.
# Any other argument is a torchtitan --section.key override passed through unchanged.
set -euo pipefail
cd "$(dirname "$0")"

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
LOG_RANK=${LOG_RANK:-0}
TRAIN_MODULE=${TRAIN_MODULE:-neollm.train}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug.toml}

config_args=(--job.config_file "$CONFIG_FILE")
for arg in "$@"; do
  case "$arg" in
    --job.config_file|--job.config_file=*|--job.config-file|--job.config-file=*) config_args=() ;;
  esac
done

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores=$(nproc)
  export OMP_NUM_THREADS=$(( cores / NGPU > 0 ? cores / NGPU : 1 ))
fi
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
export NEOLLM_COMPILE_CACHE=${NEOLLM_COMPILE_CACHE-$PWD/.cache/compile}

if [[ "${NEOLLM_SKIP_PREFLIGHT:-0}" != 1 ]]; then
  "${PYTHON:-python3}" -m neollm.preflight --world-size "$(( NGPU * NNODES ))" "${config_args[@]}" "$@" || exit $?
fi

if [[ "$NNODES" != 1 || -n "${MASTER_ADDR:-}" ]]; then
  rendezvous=(--nnodes="$NNODES" --rdzv_backend c10d --rdzv_id="${RDZV_ID:-neollm}"
              --rdzv_endpoint="${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}")
  if [[ -n "${NODE_RANK:-}" ]]; then rendezvous+=(--node_rank="$NODE_RANK"); fi
else
  rendezvous=(--rdzv_backend c10d --rdzv_endpoint="localhost:0")
fi

exec torchrun --nproc_per_node="$NGPU" "${rendezvous[@]}" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m "$TRAIN_MODULE" "${config_args[@]}" "$@"
