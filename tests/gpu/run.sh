#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU (tested target: one H200, torch 2.11+cu130,
# Python 3.12, no network), build the CUDA extension, run the CUDA tests and the kernel
# benchmarks, and save everything under tests/gpu/results/<date>/. Under 8 minutes.
#
#   bash tests/gpu/run.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-tests/gpu/results/$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} HYPOTHESIS_PROFILE=gpu
status=0
step() { echo; echo "=== $1 ($(date -u +%T))"; }
exec > >(tee "$OUT/log.txt") 2>&1   # everything below is also saved in $OUT/log.txt

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1

step "build the CUDA extension (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
# The machine has its own CUDA torch: install nothing else, use it as it is.
FORCE_CUDA=1 timeout 300 pip install --no-build-isolation --no-deps --no-index -e . || status=1
python -c "import minihires.ops as o; print({op: o.backend(op, 'cuda') for op in o.OPS})" || status=1

step "CUDA tests"
timeout 180 python -m pytest -q -m cuda tests/ -p no:cacheprovider || status=1

step "benchmarks"
timeout 150 python -m minihires bench all --device cuda --out "$OUT/bench.md" || status=1
step "done: status $status (0 = every step passed)"
exit $status
