#!/usr/bin/env bash
# GPU check of the kernels, on a machine with an NVIDIA GPU (target: one H200, 16 cores,
# torch 2.11+cu130, Python 3.12, nvcc 13.0, no network). Steps, each under its own time limit:
#
#   machine    GPU, driver, Python, torch, nvcc
#   preflight  names anything missing (tests/gpu/preflight.py); collects the kernel tests
#   build      the CUDA extension in place, MAX_JOBS=16, with each kernel's registers and
#              spills (-Xptxas -v) in the log
#   tests      the cuda-marked kernel tests (HYPOTHESIS_PROFILE=gpu, huge tests on)
#   memcheck, racecheck, synccheck
#              compute-sanitizer on tests/gpu/sanitize.py (every kernel once)
#   bench      python -m minihires bench all --device cuda
#
# The log, the benchmark tables and a summary line with every step's exit status and time go
# to tests/gpu/results/<UTC date>/ (to $OUT/<UTC date>/ when $OUT is set). The time limits
# add up to under 480 s, so the whole check finishes within 8 minutes by construction.
#
#   bash tests/gpu/run.sh             # on the GPU machine, from anywhere in the repository
#   bash tests/gpu/run.sh --dry-run   # on a CPU machine: the budget, the preflight, the imports
#                                     # and the collection of the kernel tests; no GPU step runs
# PYTHON=... picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "error: unknown argument ${1} (usage: bash tests/gpu/run.sh [--dry-run])" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
KERNEL_TESTS=(tests/test_stitch.py tests/test_window_attn_pool.py tests/test_ops_*.py)

# --- the time budget -------------------------------------------------------------------------
STEPS=(machine preflight build tests memcheck racecheck synccheck bench)
declare -A LIMIT=([machine]=10 [preflight]=25 [build]=180 [tests]=130 [memcheck]=30 [racecheck]=20
                  [synccheck]=15 [bench]=60)
BUDGET=480
total=0
for s in "${STEPS[@]}"; do total=$((total + LIMIT[$s])); done
if ((total >= BUDGET)); then
  echo "error: the step time limits add up to ${total} s, not under ${BUDGET} s" >&2
  exit 1
fi

if ((DRY)); then
  RESULTS=$(mktemp -d)
else
  RESULTS="${OUT:-tests/gpu/results}/$(date -u +%Y-%m-%d)"
fi
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/log.txt") 2>&1   # everything below is also saved in the log

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
export MINIHIRES_PTXAS_VERBOSE=1 MINIHIRES_NVCC_THREADS=0 HYPOTHESIS_PROFILE=gpu MINIHIRES_HUGE_TESTS=1
echo "results: $RESULTS; time budget: the step limits add up to ${total} s (< ${BUDGET} s)$( ((DRY)) && echo ', dry run')"

SUMMARY=()
STATUS=0
SKIPPED=77   # a step's exit status for "cannot run on this machine" (it says why)
# A dry run's steps run on a slower, shared CPU machine that says nothing about the GPU
# machine's times: they get 8 times the limits.
SCALE=$(( DRY ? 8 : 1 ))
# step NAME COMMAND: runs COMMAND (a bash string) under NAME's time limit; records its status.
step() {
  local name=$1 cmd=$2 start=$SECONDS rc limit=$((LIMIT[$1] * SCALE))
  echo
  echo "=== ${name} ($(date -u +%T), limit ${limit} s)"
  timeout --kill-after=5 "$limit" bash -o pipefail -c "$cmd"
  rc=$?
  local took=$((SECONDS - start)) what="exit ${rc}"
  ((rc == 124 || rc == 137)) && what="timeout"
  ((rc == SKIPPED)) && what="skipped" && rc=0
  echo "=== ${name}: ${what}, ${took} s"
  SUMMARY+=("${name}=${what// /}(${took}s)")
  ((rc != 0)) && STATUS=1
  return 0
}
skip() {  # skip NAME WHY
  echo
  echo "=== ${1} (skipped: ${2})"
  SUMMARY+=("${1}=skipped")
}

# Collect the cuda-marked kernel tests (a subshell: its exit status ends only itself).
COLLECT="($PY -m pytest -q --collect-only -m cuda -p no:cacheprovider ${KERNEL_TESTS[*]} > \"$RESULTS/collect.txt\" 2>&1;
  rc=\$?; tail -1 \"$RESULTS/collect.txt\"
  grep -E '^(ERROR|E )' \"$RESULTS/collect.txt\" && exit 1
  n=\$(grep -oE '^[0-9]+(/[0-9]+)? tests? collected' \"$RESULTS/collect.txt\" | grep -oE '^[0-9]+')
  [ \"\${n:-0}\" -gt 0 ] || { echo 'no cuda-marked kernel tests collected'; exit 1; }
  exit \$rc)"

if ((DRY)); then
  step machine "$PY -c \"import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)\"; echo 'no GPU: dry run'"
  step preflight "$PY tests/gpu/preflight.py --dry-run && $COLLECT && $PY -c 'import minihires.ops, minihires.cli.bench, minihires.benchmarks.stitch, minihires.benchmarks.window_attn_pool' && $PY tests/gpu/sanitize.py --device cpu"
  for s in build tests memcheck racecheck synccheck bench; do skip "$s" "dry run"; done
else
  step machine "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY -c \"import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)\"; nvcc --version | tail -1"
  step preflight "$PY tests/gpu/preflight.py && $COLLECT"
  # The machine has its own CUDA torch: build against it, install nothing.
  step build "$PY setup.py build_ext --inplace 2>&1 | tee \"$RESULTS/build.txt\" &&
    echo \"ptxas -v: \$(grep -c 'Used [0-9]* registers' \"$RESULTS/build.txt\") kernels (registers, stack frames, spills above)\" &&
    $PY -c \"import minihires.ops as o; k = {op: o.backend(op, 'cuda') for op in o.OPS}; print(k); assert set(k.values()) == {'cuda kernel'}, 'a CUDA kernel is missing'\""
  step tests "$PY -m pytest -q -m cuda -p no:cacheprovider --durations=15 ${KERNEL_TESTS[*]}"
  SANITIZER=$(command -v compute-sanitizer || echo "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")/compute-sanitizer")
  for tool in memcheck racecheck synccheck; do
    if [ ! -x "$SANITIZER" ]; then
      skip "$tool" "compute-sanitizer not found"
      continue
    fi
    # skipped when this machine's runtime refuses the sanitizer (gVisor: "Device not supported")
    step "$tool" "PYTORCH_NO_CUDA_MEMORY_CACHING=1 \"$SANITIZER\" --tool $tool --error-exitcode 1 --print-limit 20 \
        $PY tests/gpu/sanitize.py > \"$RESULTS/$tool.txt\" 2>&1; rc=\$?; tail -25 \"$RESULTS/$tool.txt\";
      if grep -q 'Device not supported' \"$RESULTS/$tool.txt\"; then echo 'compute-sanitizer does not support this device here'; exit $SKIPPED; fi
      exit \$rc"
  done
  step bench "$PY -m minihires bench all --device cuda --out \"$RESULTS/bench.md\""
fi

echo
echo "summary: ${SUMMARY[*]} total=${SECONDS}s status=${STATUS}"
exit $STATUS
