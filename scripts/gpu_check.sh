#!/usr/bin/env bash
# One command for a machine with an H200 and nvcc: build, run the GPU tests, run the benchmarks, and write
# benchmarks/results/<gpu>-<date>.json (also copied to $OUT when set). Needs no network: CUTLASS headers come from
# CUTLASS_DIR, an installed nvidia-cutlass, or a wheel placed under .whl/ (pip download --no-deps nvidia-cutlass).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
mkdir -p build

if [ -z "${CUTLASS_DIR:-}" ] && ! $python -c "import cutlass_library" 2>/dev/null; then
  wheel=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
  if [ -n "$wheel" ]; then
    mkdir -p build/cutlass && $python -m zipfile -e "$wheel" build/cutlass
    export CUTLASS_DIR=$PWD/build/cutlass/cutlass_library/source/include
  fi
fi

echo "== build"
DSV3_CUDA=ON $python -m pip install --no-build-isolation --no-deps -e . >build/gpu_check_build.log 2>&1 \
  || { tail -n 60 build/gpu_check_build.log; exit 1; }
grep -iE "spill|lmem" build/gpu_check_build.log | grep -v " 0 bytes" || echo "ptxas: no spills reported"
$python -m dsv3 info

echo "== GPU tests"
$python -m pytest -q tests/cuda -p no:cacheprovider 2>&1 | tail -n 25
tests_status=${PIPESTATUS[0]}

echo "== self-check + benchmarks"
$python -m dsv3 check --device cuda
gpu=$($python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
result=benchmarks/results/${gpu}-$(date +%Y-%m-%d).json
$python -m dsv3 bench all --device cuda --json "$result"
[ -n "${OUT:-}" ] && cp "$result" build/gpu_check_build.log "$OUT"/

echo "== summary: tests exit ${tests_status}, results in ${result}, $(( $(date +%s) - started )) s"
exit "$tests_status"
