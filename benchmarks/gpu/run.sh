#!/usr/bin/env bash
# One command for a lent GPU machine (H200 here: no network, torch 2.11 + triton 3.6 preinstalled, no
# DALI, no xformers, no PyAV). Runs the `gpu` tests, then the GPU benchmarks, and prints a short table.
# Everything it prints also goes to RESULTS (default: $OUT when set by the device tool, else
# benchmarks/results/gpu-<date>); commit what it wrote.
#
#   bash benchmarks/gpu/run.sh [RESULTS_DIR]
#
# Budget: under 8 minutes in all (tests <= 4 incl. ~2 of kernel compilation, benchmarks <= 3.5); each step
# has its own timeout so a hang in one does not eat the others' time. DALI cannot be carried to the H200
# (199 MB); the DALI GPU benchmark runs only where DALI is installed and skips elsewhere.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

echo "== install (no network: --no-deps --no-build-isolation)"
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RESULTS/gpu_machine.txt"
$PY -m stpcore info | tee -a "$RESULTS/gpu_machine.txt"

echo "== gpu tests (ops, kernels, models; data tests need PyAV, which this machine lacks)"
timeout 240 $PY -m pytest tests/kernels tests/ops tests/models tests/test_inference.py -m gpu -q -p no:cacheprovider -x 2>&1 \
  | tee "$RESULTS/gpu_tests.txt" | tail -25

echo "== gpu benchmarks"
timeout 210 $PY -m pytest benchmarks/bench_attention.py benchmarks/bench_select.py benchmarks/bench_model.py \
  benchmarks/bench_data.py::test_dali_gpu \
  -k "not cpu_target and not small" --benchmark-only --benchmark-min-rounds=5 --benchmark-max-time=0.5 \
  --benchmark-json="$RESULTS/gpu_bench.json" -q -p no:cacheprovider 2>&1 | tail -15 | tee "$RESULTS/gpu_bench.txt"

echo "== table"
$PY benchmarks/gpu/table.py "$RESULTS/gpu_bench.json" | tee "$RESULTS/gpu_table.md"
