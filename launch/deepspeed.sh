#!/usr/bin/env bash
# The DeepSpeed launcher (pdsh/ssh to every host of a hostfile; see launch/hostfile.example):
#   HOSTFILE=launch/hostfile launch/deepspeed.sh parallel=zero2 experiment=laion_vit_b32
#   NPROC=2 launch/deepspeed.sh parallel=zero3          (one node, no hostfile; on a CPU: two gloo processes)
# The DeepSpeed JSON is generated from clipkit's config (parallel=zero1|zero2|zero3, train.*, optim.*); there is
# no JSON file to pass. The launcher appends --local_rank=N, which clipkit accepts and ignores (LOCAL_RANK is set).
set -euo pipefail
args=()
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile="${HOSTFILE}")
fi
if [[ -n "${NPROC:-}" ]]; then
  args+=(--num_gpus="${NPROC}")
fi
args+=(--master_port="${MASTER_PORT:-29500}")
exec deepspeed "${args[@]}" --module clipkit train "$@"
