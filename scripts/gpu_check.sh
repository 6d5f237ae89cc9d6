#!/usr/bin/env bash
# One command for a machine with an H200 and nvcc: build, run the GPU tests, run the benchmarks, the GEMM schedule
# sweep and (with ncu) kernel profiles, and write benchmarks/results/<gpu>-<date>.json (and -gemm-schedules.json).
# Needs no network: CUTLASS headers come from CUTLASS_DIR, an installed nvidia-cutlass, or a wheel placed under .whl/
# (pip download --no-deps nvidia-cutlass). Each stage has a time limit so that a hung kernel costs one stage, not the
# whole run; with LOG_DIR set, every stage's full log is written there. STAGES picks stages (default: all of build
# smoke tests check bench sweep profiles), e.g. two shorter runs on the same machine, "build smoke tests" then
# "check bench sweep profiles": the second reuses the build and the smoke runs' verdicts (build/skip_kernels).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
logs=${LOG_DIR:-build}
mkdir -p build "$logs"
stage() { echo "== $1 ($(( $(date +%s) - started )) s)"; }
stages=" ${STAGES:-build smoke tests check bench sweep profiles} "
wanted() { [[ "$stages" == *" $1 "* ]]; }
tests_status=0

if [ -z "${CUTLASS_DIR:-}" ] && ! $python -c "import cutlass_library" 2>/dev/null; then
  wheel=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)
  if [ -n "$wheel" ]; then
    mkdir -p build/cutlass && $python -m zipfile -e "$wheel" build/cutlass
    export CUTLASS_DIR=$PWD/build/cutlass/cutlass_library/source/include
  fi
fi

if wanted build; then
  stage build
  DSV3_CUDA=ON timeout 420 $python -m pip install --no-build-isolation --no-deps -e . >"$logs/build.log" 2>&1 \
    || { tail -n 60 "$logs/build.log"; exit 1; }
  grep -iE "spill|lmem" "$logs/build.log" | grep -v " 0 bytes" || echo "ptxas: no spills reported"
  $python -m dsv3 info
fi

if wanted smoke; then
  stage "smoke runs of the kernels not yet proven on a GPU"
  # Each in its own process with a short limit: one that hangs or computes garbage costs 60 s here, and the stages
  # below leave it out (DSV3_SKIP_KERNELS) instead of timing out on it test after test.
  failed=()
  for name in $($python scripts/smoke_untried_kernels.py --list); do
    timeout 60 $python scripts/smoke_untried_kernels.py "$name" >>"$logs/smoke.log" 2>&1 || failed+=("$name")
  done
  echo "${failed[*]:-}" >build/skip_kernels
  tail -n 5 "$logs/smoke.log"
fi
[ -f build/skip_kernels ] && export DSV3_SKIP_KERNELS="$(cat build/skip_kernels)"
echo "failed smoke runs: ${DSV3_SKIP_KERNELS:-none}"

wanted tests && {
stage "GPU tests"
options=()
# A hung kernel blocks inside the CUDA runtime, where only the thread method's timeout still fires; 10 s before it,
# faulthandler writes every thread's stack to the log, so a killed test still says where it was.
test_timeout=${TEST_TIMEOUT:-60}
options+=(-o "faulthandler_timeout=$(( test_timeout - 10 ))")
$python -c "import pytest_timeout" 2>/dev/null && options+=(--timeout "$test_timeout" --timeout-method thread)
# Worker processes (pytest-xdist) also keep a crashing test from ending the run: its worker is replaced.
$python -c "import xdist" 2>/dev/null && options+=(-n "${TEST_WORKERS:-8}")
OMP_NUM_THREADS=2 timeout "${TESTS_LIMIT:-240}" $python -m pytest -v tests/cuda -p no:cacheprovider -rfE --durations=25 "${options[@]}" \
  >"$logs/tests.log" 2>&1
tests_status=$?
grep -E "FAILED|ERROR|crashed|Timeout|[0-9]+ (passed|failed)" "$logs/tests.log" | tail -n 60
sed -n "/slowest/,/^$/p" "$logs/tests.log" | head -n 30
}

wanted check && {
stage self-check
timeout 120 $python -m dsv3 check --device cuda 2>&1 | tail -n 30
}

gpu=$($python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
result=benchmarks/results/${gpu}-$(date +%Y-%m-%d).json
wanted bench && {
stage benchmarks
# the A/B suites of the kernels not yet proven on a GPU first (their smoke runs passed, or DSV3_SKIP_KERNELS leaves
# them out): their rows decide the next defaults, and a time limit that ends the stage early costs the others
timeout "${BENCH_LIMIT:-300}" $python -m dsv3 bench ${BENCH_SUITES:-gemm_kernels mla_rows all} --device cuda \
  --json "$result" \
  >"$logs/bench.log" 2>&1
echo "bench exit $?"
[ -f "$result" ] && [ "$logs" != build ] && cp "$result" "$logs"/
}

sweep=${result%.json}-gemm-schedules.json
wanted sweep && {
stage "GEMM schedule sweep"
timeout "${SWEEP_LIMIT:-120}" $python benchmarks/sweep_gemm_schedule.py --json "$sweep" >"$logs/sweep.log" 2>&1
echo "sweep exit $?"; tail -n 45 "$logs/sweep.log"
[ -f "$sweep" ] && [ "$logs" != build ] && cp "$sweep" "$logs"/
}

wanted profiles && {
stage "kernel profiles"
# Nsight Compute on the target cases (benchmarks/profile_cases.py): throughput, issue and stall statistics per kernel.
if command -v ncu >/dev/null; then
  timeout "${PROFILE_LIMIT:-150}" ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section InstructionStats \
    -o build/profiles -f $python benchmarks/profile_cases.py >"$logs/profile.log" 2>&1
  echo "profile exit $?"
  ncu -i build/profiles.ncu-rep --page details >"$logs/profiles.txt" 2>&1
  grep -E "^  [a-zA-Z_:<]|Duration|DRAM Throughput|Compute \(SM\) Throughput|Issued Instructions  " "$logs/profiles.txt" \
    | cut -c1-150 | head -n 60
else
  echo "ncu not on the PATH: no profiles"
fi
}

stage "summary: tests exit ${tests_status}, results in ${result}"
exit "$tests_status"
