#!/usr/bin/env bash
# Train on a multi-node GPU cluster under SLURM: one process per node, each driving its node's GPUs;
# jax.distributed reads the SLURM environment to find the coordinator and the other processes.
#   NODES=4 GPUS_PER_NODE=8 bash launch/slurm_gpu.sh [--dry-run] CONFIG.yaml [--section.key=value ...]
# Run it from this repository on a shared filesystem; set PARTITION, TIME and ACCOUNT as your site needs.
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
[ $# -ge 1 ] || { echo "usage: NODES=N GPUS_PER_NODE=G $0 [--dry-run] CONFIG.yaml [overrides]" >&2; exit 2; }
nodes=${NODES:-2}; gpus=${GPUS_PER_NODE:-8}
args=$(printf ' %q' "$@")
opts=(--job-name=jaxsae --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus" --time="${TIME:-24:00:00}")
[ -n "${PARTITION:-}" ] && opts+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && opts+=(--account="$ACCOUNT")
script="JAXSAE_EXTRAS=cuda,dev bash scripts/setup.sh && srun .venv/bin/jaxsae train --distributed$args"
cmd=(sbatch "${opts[@]}" --wrap "$script")
if [ "$dry" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
