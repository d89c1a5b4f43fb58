#!/usr/bin/env bash
# Every GPU figure and the GPU tests in one command, on the GPU machine, from the repository root:
#   bash benchmarks/gpu_suite.sh            (about 6 minutes on one H200, the install included)
#   bash benchmarks/gpu_suite.sh --dry-run  (any machine: tiny sizes, the same parts and outputs; make test runs it)
# 1. if clipkit or what it needs is missing, installs the wheels benchmarks/gpu_wheels.py built into .gpu-wheels/
#    (no network; --no-deps into a folder of its own, so the image's torch stays what it is) and stops at once,
#    naming the package, if that fails;
# 2. runs benchmarks/gpu_suite.py: the GPU tests, then the figures. Writes gpu_suite.json, gpu_suite.md and
#    gpu_suite.log.gz to $OUT (the device tool's folder that comes back; default benchmarks/out/gpu). Caches and
#    run directories stay in a temporary folder.
# GPU_SUITE_INSTALL=1 installs even when the imports work (a check of the carried set); PYTHON picks the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
WHEELS="${GPU_WHEELS:-.gpu-wheels}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/clipkit-gpu-suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PIP_DISABLE_PIP_VERSION_CHECK=1

MODULES="clipkit open_clip webdataset hydra omegaconf deepspeed braceexpand ftfy"
if [ -n "${GPU_SUITE_INSTALL:-}" ] || ! "$PYTHON" -c "import ${MODULES// /, }" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_suite: no wheels in $WHEELS/: run 'python benchmarks/gpu_wheels.py' where PyPI is reachable and carry" \
      "the folder" >&2
    exit 2
  fi
  SITE="$WORK/site"
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
      >"$WORK/pip.log" 2>&1; then
    echo "gpu_suite: installing the carried wheels failed, stopping: $(grep -m1 -E 'ERROR|error' "$WORK/pip.log")" >&2
    exit 3
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  for module in $MODULES; do
    if ! err="$("$PYTHON" -c "import $module" 2>&1)"; then
      echo "gpu_suite: '$module' does not import after the install, stopping: $(echo "$err" | tail -1)" >&2
      exit 3
    fi
  done
fi
"$PYTHON" benchmarks/gpu_suite.py --out "$OUT" --work "$WORK" "$@"
