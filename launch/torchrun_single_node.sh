#!/usr/bin/env bash
# One node, one process per GPU (or N CPU processes with the gloo backend):
#   launch/torchrun_single_node.sh [key=value ...]           e.g. model=vit_b32 data=shards data.train='/data/{0000..0999}.tar'
#   NPROC=2 launch/torchrun_single_node.sh                   (CPU: two gloo processes on the demo data)
# Only sets up the launch; everything else is `clipkit train` with the same overrides as a single process.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -gt 0 ]] || NPROC=1
fi
exec torchrun --standalone --nproc_per_node="${NPROC}" -m clipkit train "$@"
