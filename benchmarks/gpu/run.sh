#!/usr/bin/env bash
# The GPU harvest: one command for a lent GPU machine (H200 here: no network; torch 2.11, triton 3.6, pytest,
# pytest-benchmark, pytest-timeout, pytest-xdist and hypothesis preinstalled; no DALI, xformers or PyAV).
#
#   bash benchmarks/gpu/run.sh [RESULTS_DIR]        # default: $OUT (the device tool), else benchmarks/results/gpu-<date>
#   DRY_RUN=1 bash benchmarks/gpu/run.sh DIR        # any machine: plan every step, collect the pytest ones, run none
#
# Steps, in order of value, each a subprocess with its own limit, killed when it overruns (the limits add up to
# at most 300 s; extras are dropped from the end to fit): install, machine facts, a parallel Triton warm-up of
# every specialisation the benchmarks use, the kernel benchmark groups (policy attention, varlen, tokens),
# the whole-model benchmarks (inference, phase-2 step), the GPU tests (tests/kernels and tests/models but the
# sm_90 compile check that CI runs, every `gpu` test elsewhere; parallel workers), then the extras: a torch.profiler table, the tile sweep, the
# phase-1 step, flex attention. Every step writes its files as it ends, so a step cut by its limit loses only
# itself. At most 8 files, directly in RESULTS_DIR: machine.txt kernels.json model.json table.md tests.txt
# profile.txt tiles.json log.txt (benchmarks/gpu/harvest.py says what each holds). Commit what it wrote:
# benchmarks/results/gpu-<date>/ and the numbers in BENCHMARKS.md; `python benchmarks/gpu/tiles.py merge
# RESULTS_DIR/tiles.json` puts the measured tiles into kernels/tiles.json.
# Wall time: the limits add up to 300 s, kept as one deadline (a step that overruns shortens the ones after it);
# only the last step can end past it, by up to ~13 s (SIGINT grace, SIGTERM, SIGKILL), so give the device call a
# timeout of 360 s or more, and leave room for one rerun. A failed install (or one cut before pip finished) stops
# the plan; stopping the harvest (SIGTERM, Ctrl-C) kills the running step with it.
# PLAN=compile bash benchmarks/gpu/run.sh DIR runs only the torch.compile benchmarks (compiled + CUDA-graph
# inference at B=32, a compiled phase-2 step; 300 s of limits, compile time included): a second device call
# when time is left after the default plan, whose 300 s leave them out.
# DALI cannot be carried to the H200 (199 MB): its GPU decoder is verified by the CPU DALI tests and review.
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${1:-${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
DRY=()
if [ -n "${DRY_RUN:-}" ] && [ "${DRY_RUN}" != 0 ]; then DRY=(--dry-run); fi
exec "$PY" benchmarks/gpu/harvest.py "$RESULTS" --python "$PY" --plan "${PLAN:-default}" "${DRY[@]}"
