#!/usr/bin/env bash
# Train on a Cloud TPU pod: the same command runs on every worker; JAX finds the other workers itself.
#   TPU_NAME=my-pod ZONE=us-central2-b bash launch/tpu_pod.sh [--dry-run] CONFIG.yaml [--section.key=value ...]
# Each worker needs this repository at ~/jaxsae (e.g. `gcloud compute tpus tpu-vm scp` or git clone) and
# the activation store on a path every worker can read (e.g. a GCS FUSE mount).
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}" "${ZONE:?set ZONE to its zone}"
[ $# -ge 1 ] || { echo "usage: TPU_NAME=... ZONE=... $0 [--dry-run] CONFIG.yaml [overrides]" >&2; exit 2; }
args=$(printf ' %q' "$@")
remote="cd ~/jaxsae && JAXSAE_EXTRAS=tpu,dev bash scripts/setup.sh && .venv/bin/jaxsae train --distributed$args"
cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$remote")
if [ "$dry" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
