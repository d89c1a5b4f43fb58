#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same line on every node (any order):
#   NNODES=4 NPROC=8 RDZV_ENDPOINT=node001:29500 RUN_ID=vitb32-laion launch/torchrun_multi_node.sh \
#       experiment=laion_vit_b32 hydra.run.dir=/shared/runs/vitb32-laion
# RDZV_ENDPOINT is host:port of any one node reachable from all; RUN_ID must be the same on every node.
# The run dir must be on a file system every node sees (rank 0 writes it; DeepSpeed ranks add their shards).
# Only sets up the launch; everything else is `clipkit train` with the same overrides as a single process.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one node}"
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -gt 0 ]] || NPROC=1
fi
exec torchrun --nnodes="${NNODES}" --nproc_per_node="${NPROC}" \
  --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT}" --rdzv_id="${RUN_ID:-clipkit}" \
  -m clipkit train "$@"
