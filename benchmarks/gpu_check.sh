#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (see benchmarks/gpu_check.py for what it measures).
#
# Prepare here (CPU machine, once): bash benchmarks/gpu_check.sh --fetch-wheels
#   downloads the wheels the GPU image lacks (pydantic and its deps) into .whl/ (git-ignored).
# On the GPU machine (device tool: carry [".whl"], timeout_s 600):
#   bash benchmarks/gpu_check.sh
# Prints ONE JSON line on stdout; writes $OUT/gpu_check.json when $OUT is set (device tool), else
# benchmarks/results/gpu_check.json, which benchmarks/render.py puts into RESULTS.md with the GPU name.
# Parts (--parts, default all): loader (JPEG decode + training view img/s, min(16, cores) workers) and loop
# (img/s of `distillctl run` SimReg from a cached ResNet-50, MobileNetV2 at 224 px, bf16, channels_last) run
# first, on 2048 synthetic JPEGs, and are saved before the synthetic steps, the cache and ONNX Runtime CUDA.
# Budget: ~1 min wheel install + ~2 min loader/loop + ~4-6 min of compile and timing; the python part is
# capped at 480 s (what finished is still in the JSON file). A shorter check: bash benchmarks/gpu_check.sh
# --parts loader,loop   (extra arguments go to gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  for spec in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$spec"
  done
  ls -la .whl
  exit 0
fi

PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
RESULT_DIR=${OUT:-benchmarks/results}
mkdir -p "$RESULT_DIR"
timeout 480 "$PY" benchmarks/gpu_check.py --out "$RESULT_DIR/gpu_check.json" "$@"
