#!/bin/bash
# Continual pre-training as a SLURM batch job: one torchrun per node (srun, one task per
# node), c10d rendezvous on the first node of the allocation, every GPU of a node a rank.
#
#   sbatch launch/slurm_cpt.sh configs/llama2-7b-zero3.yaml [key=value ...]
#   sbatch --nodes 4 --time 24:00:00 launch/slurm_cpt.sh configs/llama2-7b-zero3.yaml
#
# Preemption and time limits: SLURM sends SIGTERM to this script 120 s before the time limit
# (--signal=B:TERM@120); the trap below forwards it through srun and torchrun to the
# training processes, which save a checkpoint at the next step boundary and exit. The script
# then requeues the job (--requeue keeps its id, so the output file is appended to), and the
# requeued job runs this same command, which resumes from output_dir's latest complete
# checkpoint (resume: auto). A preempted job (SLURM's PreemptMode=REQUEUE) is requeued by
# SLURM itself; its processes get SIGTERM directly and checkpoint the same way, within the
# cluster's grace time.
#
# Failures end the job in minutes, not after a collective times out (engine.dist_timeout_minutes,
# 30 by default) on the ranks still alive: a worker that exits non-zero makes its node's torchrun
# stop the node's other workers and exit non-zero (--max_restarts 0), and srun's
# --kill-on-bad-exit=1 then ends the tasks of every other node. A node that dies is SLURM's to
# notice (the job ends unless --no-kill). A rank that hangs without dying (a stuck collective)
# is ended by the NCCL watchdog after engine.dist_timeout_minutes
# (TORCH_NCCL_ASYNC_ERROR_HANDLING=1: abort the process, not wait forever). A signal-triggered
# checkpoint is not cut short by this: it is collective and complete before any rank exits.
#
# output_dir must be on a filesystem every node sees (checkpoints, logs): see README.md.
#SBATCH --job-name=migu-cpt
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: sbatch launch/slurm_cpt.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit 2

# Overridable from the environment (sbatch --export=ALL,PYTHON=...,NPROC_PER_NODE=...).
export PYTHON=${PYTHON:-.venv/bin/python}
export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
export RDZV_HOST=${RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# torchrun forwards SIGTERM to its workers, then SIGKILLs them after this many seconds: leave
# them the time to finish a step and write a checkpoint, within the 120 s signal lead.
export SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A collective that times out aborts the process (torchrun's default too; explicit here).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x" \
    "$NPROC_PER_NODE, rendezvous $RDZV_HOST:$RDZV_PORT, config $*"

stopping=0
on_term() {
    stopping=1
    echo "SIGTERM: forwarding to the training processes (checkpoint, then exit)"
    kill -TERM "$srun_pid" 2>/dev/null
}
trap on_term TERM

# Single quotes: SLURM_NODEID is each node's own, expanded by that node's shell.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node "$NPROC_PER_NODE" \
        --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
        --max_restarts 0 --shutdown_timeout "$SHUTDOWN_TIMEOUT" \
        launch/cpt.py --config "$@"' migu-cpt "$@" &
srun_pid=$!
wait "$srun_pid"
rc=$?
if [[ $stopping == 1 ]]; then
    wait "$srun_pid"  # the first wait returned when the trap ran; wait for the checkpoint
    echo "stopped by SIGTERM; requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
