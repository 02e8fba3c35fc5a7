#!/usr/bin/env bash
# NeoLLM on several nodes under SLURM: one torchrun per node (srun), c10d rendezvous on the first
# node, HSDP = parameters sharded over the GPUs of a node, replicated across nodes.
#
#   sbatch --nodes=4 scripts/slurm_train.sh --job.config_file train_configs/neollm_135m.toml
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_train.sh --job.config_file X.toml --training.steps 20000
#
# Any argument is passed to run_train.sh (torchtitan --section.key overrides). The replicate
# degree is set to the number of nodes and the shard degree to the GPUs per node unless the
# arguments set them. Preemption: SLURM sends SIGTERM (here 120 s before the time limit, see
# --signal) to every task; the trainer saves a checkpoint at the end of its current step and
# exits. Requeue or resubmit the same command and it resumes from the newest valid checkpoint.
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE or 8), MASTER_PORT (default 29500),
# PYTHON (the interpreter of the venv, default python3), plus everything run_train.sh reads.
#
#SBATCH --job-name=neollm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script from the spool: SLURM_SUBMIT_DIR is the repository root
# when submitted from there.
REPO=${NEOLLM_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
cd "$REPO"

NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || echo localhost)}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-neollm}}

parallel_args=()
case " $* " in *"data_parallel_replicate_degree"*) ;; *)
  parallel_args+=(--parallelism.data_parallel_replicate_degree "$NNODES") ;; esac
case " $* " in *"data_parallel_shard_degree"*) ;; *)
  parallel_args+=(--parallelism.data_parallel_shard_degree "$GPUS_PER_NODE") ;; esac

echo "neollm: $NNODES node(s) x $GPUS_PER_NODE GPU(s), rendezvous $MASTER_ADDR:$MASTER_PORT (id $RDZV_ID)"

# One task per node; each runs run_train.sh (preflight, then torchrun with the c10d rendezvous).
# --kill-on-bad-exit: one node failing stops the others instead of leaving them waiting.
exec srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="$NNODES" \
  env NGPU="$GPUS_PER_NODE" NNODES="$NNODES" MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" \
      RDZV_ID="$RDZV_ID" \
  ./run_train.sh "${parallel_args[@]}" "$@"
