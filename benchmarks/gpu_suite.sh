#!/usr/bin/env bash
# All GPU figures in one command, on the GPU machine, from the repository root:
#   bash benchmarks/gpu_suite.sh [--quick]
# 1. installs clipkit and what the GPU image lacks (open_clip, webdataset, Hydra, DeepSpeed, wandb, ...) from the
#    wheels `make gpu-wheels` downloaded into .gpu-wheels/ (no network needed there);
# 2. runs the GPU tests (pytest -m gpu tests/gpu);
# 3. runs benchmarks/gpu_suite.py: train step vs open_clip, loss memory 4k-128k, compile vs eager.
# Results: $OUT (default benchmarks/out/gpu; on the device tool, $OUT is the folder that comes back).
# SKIP_GPU_TESTS=1 skips step 2 (e.g. for the second and third part of a suite run in parts).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
WHEELS="${GPU_WHEELS:-.gpu-wheels}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline

if ! python -c "import clipkit, open_clip, webdataset, hydra, deepspeed" 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "no $WHEELS/: run 'make gpu-wheels' on a machine with PyPI access and carry the folder" >&2
    exit 2
  fi
  # torch stays the image's own (its CUDA build); everything else comes from the carried wheels.
  python -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation --no-deps "$WHEELS"/*.whl \
    "$WHEELS"/*.tar.gz 2>&1 | tail -5
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
if [ -z "${SKIP_GPU_TESTS:-}" ]; then
  python -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
fi
python benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
