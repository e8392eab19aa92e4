#!/usr/bin/env bash
# One command for a lent GPU machine (H200 here: no network, torch 2.11 + triton 3.6 preinstalled, pytest,
# pytest-benchmark and pytest-timeout present; no DALI, no xformers, no PyAV). Runs the `gpu` tests, then the
# whole-model benchmarks (the issue's targets), then the kernel benchmarks, and prints a short table with
# the targets checked. Everything it prints also goes to RESULTS (default: $OUT when set by the device tool,
# else benchmarks/results/gpu-<date>); commit what it wrote.
#
#   bash benchmarks/gpu/run.sh [RESULTS_DIR]
#   DRY_RUN=1 bash benchmarks/gpu/run.sh DIR   # on any machine: collect (not run) every step, check the plumbing
#
# Budget: about 8 minutes in all. Each step has its own timeout, writes its own files, and a per-test timeout
# (pytest-timeout, where installed) keeps one hanging benchmark from losing the others: pytest-benchmark
# writes its JSON only when the session ends. The model benchmarks run first: they carry the targets.
# DALI cannot be carried to the H200 (199 MB): its GPU decoder is verified by the CPU DALI tests and review.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
COMMON=(-q -p no:cacheprovider -p no:xdist)  # no:xdist: pytest-benchmark switches itself off under xdist
if [ -n "${DRY_RUN:-}" ]; then
  COMMON+=(--collect-only)
fi
TEST_TIMEOUT=()
if $PY -c 'import pytest_timeout' 2>/dev/null; then
  TEST_TIMEOUT=(--timeout=90)
fi

echo "== install (no network: --no-deps --no-build-isolation)"
if [ -z "${DRY_RUN:-}" ]; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RESULTS/gpu_machine.txt"
fi
$PY -m stpcore info | tee -a "$RESULTS/gpu_machine.txt"
$PY -c 'import stpcore.kernels, triton; print("stpcore.kernels imports; triton", triton.__version__)' \
  || echo "FAIL: stpcore.kernels does not import: every 'auto' number below is the reference's"

echo "== gpu tests (the kernels and the whole model against their references; gpu-marked)"
timeout 200 $PY -m pytest tests/kernels tests/models -m gpu "${COMMON[@]}" "${TEST_TIMEOUT[@]}" --maxfail=20 2>&1 \
  | tee "$RESULTS/gpu_tests.txt" | tail -25

echo "== whole-model benchmarks (inference, phase-1 and phase-2 steps; reference vs auto)"
timeout 170 $PY -m pytest benchmarks/bench_model.py --benchmark-only "${COMMON[@]}" "${TEST_TIMEOUT[@]}" \
  --benchmark-json="$RESULTS/gpu_model.json" 2>&1 | tee "$RESULTS/gpu_model.txt" | tail -15

echo "== kernel benchmarks (attention, selection)"
timeout 150 $PY -m pytest benchmarks/bench_attention.py benchmarks/bench_select.py \
  -k "not cpu_target and not small" --benchmark-only "${COMMON[@]}" "${TEST_TIMEOUT[@]}" \
  --benchmark-json="$RESULTS/gpu_kernels.json" 2>&1 | tee "$RESULTS/gpu_kernels.txt" | tail -15

echo "== table"
$PY benchmarks/gpu/table.py "$RESULTS/gpu_model.json" "$RESULTS/gpu_kernels.json" | tee "$RESULTS/gpu_table.md"
