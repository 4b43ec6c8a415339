#!/usr/bin/env bash
# The one prepared GPU check of issue 9, for a short session on one H200 (finishes within 8 minutes):
#   1. build the library with the CUDA kernels for sm_90 (CMake, the same CMakeLists.txt that `pip install` runs:
#      SPARSESYNC_CUDA=1, CMAKE_CUDA_ARCHITECTURES=90) into build/gpu-check and point SPARSESYNC_LIB at it;
#   2. pytest -m gpu over tests/test_gpu_kernels.py (CUDA kernels == CPU kernels), then the other gpu tests;
#   3. compute-sanitizer --tool memcheck over the gpu kernel tests (PyTorch's caching allocator off, so that every
#      tensor is its own allocation and an access past one is caught), --tool racecheck over the scan tests;
#   4. python bench/gpu.py (encode / decode / tree64 against the naive PyTorch path and a device copy).
# Logs and results go to $OUT when set (the device tool's folder), else to a new bench/results/gpu-<date>-<time>/.
# At most 8 files are written there (the device tool returns 8). Exit status 0 only when every required step passed.
#
#   bench/gpu_check.sh                      everything (about 5-7 minutes on an H200)
#   GPU_CHECK_BUDGET=300 bench/gpu_check.sh  a shorter overall budget (seconds)
#   GPU_BENCH_ELEMENTS=2e8 bench/gpu_check.sh  a smaller benchmark state
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${OUT:-}" ]; then
  RES="$OUT"
else
  RES="$ROOT/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)"
  while [ -e "$RES" ]; do RES="$RES-x"; done
fi
mkdir -p "$RES"
SUMMARY="$RES/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-460}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((DEADLINE - $(date +%s))); }

# step NAME LIMIT_S REQUIRED LOGFILE CMD...: runs CMD with a timeout (never past the overall deadline)
step() {
  local name="$1" limit="$2" required="$3" log="$4"
  shift 4
  local r
  r=$(left)
  if [ "$r" -lt 15 ]; then
    note "SKIP  $name (no time left)"
    [ "$required" = 1 ] && FAILED=1
    return 0
  fi
  [ "$limit" -gt "$r" ] && limit=$r
  local t0 rc cmd0="$1"
  t0=$(date +%s)
  echo "===== $name (limit ${limit}s): $*" >>"$log"
  # through bash -c so that CMD may be one of the functions below (exported)
  timeout -k 10 "$limit" bash -c '"$@"' step "$@" >>"$log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  if [ "$rc" = 0 ]; then
    note "PASS  $name (${dt}s)"
  elif [ "$rc" = 3 ] && [ "$cmd0" = "sanitize" ]; then
    note "UNSUP $name (compute-sanitizer cannot run on this machine: not counted)"
  else
    [ "$rc" = 124 ] && note "TIME  $name (timed out after ${dt}s; rc $rc)" || note "FAIL  $name (rc $rc, ${dt}s)"
    [ "$required" = 1 ] && FAILED=1
    tail -n 25 "$log" | sed 's/^/      | /' | tee -a "$SUMMARY"
  fi
  return 0
}

note "sparsesync gpu_check $(date -u +%FT%TZ) in $ROOT -> $RES (budget ${BUDGET}s)"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" 2>&1
} | tee -a "$SUMMARY"

# ---- 1. build (a fresh build dir; nothing in sparsesync/ is overwritten)
BUILD="$ROOT/build/gpu-check"
build() {
  local t0=$(date +%s)
  # -lineinfo: compute-sanitizer reports name source lines (no effect on the generated code's speed)
  cmake -S "$ROOT" -B "$BUILD" -DSPARSESYNC_CUDA=1 -DCMAKE_CUDA_ARCHITECTURES="${SPARSESYNC_CUDA_ARCH:-90}" \
    -DCMAKE_CUDA_FLAGS=-lineinfo -DCMAKE_BUILD_TYPE=Release && cmake --build "$BUILD" --parallel "$(nproc)" || return 1
  echo "build took $(($(date +%s) - t0)) s"
}
export -f build
export ROOT BUILD PY
step "build (SPARSESYNC_CUDA=1, sm_${SPARSESYNC_CUDA_ARCH:-90})" 200 1 "$RES/build.log" build
export SPARSESYNC_LIB="$BUILD/libsparsesync.so"
grep -h "build took" "$RES/build.log" | tail -n 1 | sed 's/^/      /' | tee -a "$SUMMARY"
step "CUDA kernels available" 60 1 "$RES/build.log" "$PY" -c "
import sparsesync._native as n, sparsesync.kernels_cuda as k
print('lib', n.path, 'cuda_load_error', n.cuda_load_error)
print('available', k.available(), k.unavailable_reason())
raise SystemExit(0 if k.available() else 1)"
if [ "$FAILED" != 0 ]; then
  note "stopping: the build or the CUDA kernels are not usable (see $RES/build.log)"
  exit 1
fi

# ---- 2. the gpu tests (first the self-test the Encoder and Decoder run before using a device; not fatal here: the
# tests below say more)
step "self-test of the CUDA kernels against the CPU ones" 90 1 "$RES/tests.log" "$PY" -c "
import time, torch, sparsesync.kernels_cuda as k
t0 = time.perf_counter()
why = k.self_test(torch.device('cuda', 0))
print('self-test:', why or 'passed', f'({time.perf_counter() - t0:.2f} s)')
raise SystemExit(0 if why is None else 1)"
grep -h "^self-test:" "$RES/tests.log" | tail -n 1 | sed 's/^/      /' | tee -a "$SUMMARY"
step "pytest -m gpu tests/test_gpu_kernels.py (with the 2.2e9-element test)" 150 1 "$RES/tests.log" \
  env SPARSESYNC_GPU_BIG=1 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kernels.py
step "pytest -m gpu (the other gpu tests: codec, sessions, digest, NCCL)" 120 1 "$RES/tests.log" \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests --ignore=tests/test_gpu_kernels.py

# ---- 3. compute-sanitizer (not supported on every runtime: a refusal is reported, not counted as a failure)
SAN=compute-sanitizer
if ! command -v "$SAN" >/dev/null 2>&1; then
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer; do
    [ -x "$c" ] && SAN="$c" && break
  done
fi
sanitize() {  # sanitize TOOL ARGS...: rc 0 clean, 3 tool unsupported here, else the errors
  local tool="$1"
  shift
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 SPARSESYNC_GPU_TEST_SCALE="${SAN_SCALE:-0.25}" \
    "$SAN" --tool "$tool" --error-exitcode 17 --print-limit 50 "$@"
  local rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 17 ] && grep -q -E "Device not supported|Unable to|not supported" "$LOGNOW" 2>/dev/null; then
    echo "compute-sanitizer $tool could not run on this machine (rc $rc)"
    return 3
  fi
  return $rc
}
export -f sanitize
export SAN
if command -v "$SAN" >/dev/null 2>&1 || [ -x "$SAN" ]; then
  export LOGNOW="$RES/memcheck.log"
  step "memcheck: pytest -m gpu -x tests/test_gpu_kernels.py" 150 1 "$LOGNOW" \
    sanitize memcheck --leak-check no "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu_kernels.py
  export LOGNOW="$RES/racecheck.log"
  step "racecheck: the scan tests" 90 1 "$LOGNOW" \
    sanitize racecheck --racecheck-report all "$PY" -m pytest -m gpu -x -q -p no:cacheprovider \
    tests/test_gpu_kernels.py -k "scan2"
  grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|could not run" "$RES/memcheck.log" "$RES/racecheck.log" 2>/dev/null \
    | sed 's/^/      /' | tee -a "$SUMMARY"
else
  note "SKIP  compute-sanitizer (not found)"
  FAILED=1
fi

# ---- 4. the benchmark (whatever time is left, minus a margin)
r=$(left)
BB=$((r - 30))
[ "$BB" -lt 30 ] && BB=30
step "bench/gpu.py" $((BB + 25)) 1 "$RES/bench.log" \
  "$PY" bench/gpu.py --out "$RES" --budget "$BB" --elements "${GPU_BENCH_ELEMENTS:-2e9}"
if [ -f "$RES/gpu.txt" ]; then
  sed -n '/^summary/,$p' "$RES/gpu.txt" | sed 's/^/      /' | tee -a "$SUMMARY"
fi

note "total $(($(date +%s) - START)) s; $([ "$FAILED" = 0 ] && echo 'ALL REQUIRED STEPS PASSED' || echo 'SOME REQUIRED STEP FAILED')"
exit $FAILED
