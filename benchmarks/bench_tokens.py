"""Token benchmarks: per-stage selection + top-k + gather, scatter back, and the predictor pool.

    .venv/bin/python -m pytest benchmarks/bench_tokens.py --benchmark-only            # a real run
    .venv/bin/python -m pytest benchmarks/bench_tokens.py --benchmark-disable -q      # smoke: each case once

Providers: ``reference`` (the PyTorch references of stpcore.ops; CPU and CUDA) and ``triton`` (the kernels
of stpcore.kernels through the public ops with backend="triton"; CUDA only: the interpreter is far too
slow to time). Shapes are the paper's: B=32 videos, D=384 channels, 8 temporal slots, stages keeping
k = 34, 24, 16 tokens per slot out of N = 392, 272, 192; bf16 on CUDA, fp32 on CPU.

Per stage ("select"): the hard Gumbel keep decision of the (B, N, 2) log-probabilities (noise drawn from
a generator, as in training) and the per-slot top-k of the keep scores with the gather of the kept
(B, S*k, D) tokens (as at inference). The issue's target: under 20 microseconds of GPU time per stage on an
H200 (``extra_info["cudagraph_median_us"]``; a benchmark, not a test).

``extra_info``: GB/s from the explicit byte counts below and the mean time; on CUDA also the medians of
``triton.testing.do_bench`` (eager: the host-side launch and dispatch cost counts where the GPU waits on it)
and of ``do_bench_cudagraph`` (the step replayed from a CUDA graph: GPU time), see benchmarks/timing.py. The
Gumbel kernel reads its seed from a device tensor drawn from the default generator, so the graph replays the
same stage as the eager run, with fresh noise each replay.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.timing import gpu_times
from stpcore.ops import (
    gather_tokens_ref,
    gumbel_select,
    predictor_pool,
    scatter_tokens,
    slot_topk_gather,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
B, D, SLOTS = 32, 384, 8
STAGES = {"stage1 N392-k34": (392, 34), "stage2 N272-k24": (272, 24), "stage3 N192-k16": (192, 16)}
TARGET_US = 20.0


# ------------------------------------------------------------------------------------------- counts


def select_bytes(N: int, k: int, elem: int) -> int:
    """Least traffic of one stage: Gumbel decision (read 2 log-probs + prev_keep, write keep), top-k (read
    N scores, write S*k int64 indices) and gather (read and write S*k rows of D)."""
    kept = SLOTS * k
    gumbel = B * N * (2 + 1 + 1) * elem
    topk = B * N * elem + B * kept * 8
    gather = 2 * B * kept * D * elem
    return gumbel + topk + gather


def scatter_bytes(N: int, k: int, elem: int) -> int:
    """Read S*k rows and their indices, write the whole (B, N, D) grid (kept rows and zeros)."""
    return B * SLOTS * k * (D * elem + 8) + B * N * D * elem


def pool_bytes(N: int, elem: int) -> int:
    """Read x (B, N, D) and keep (B, N), write out (B, N, D)."""
    return B * N * (2 * D + 1) * elem


def _record(benchmark, nbytes: int, step) -> None:
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    benchmark.extra_info.update(bytes=nbytes, device=DEVICE, dtype=str(DTYPE).removeprefix("torch."))
    if mean:
        benchmark.extra_info["gbps"] = round(nbytes / mean / 1e9, 2)
    if CUDA and mean:
        times = gpu_times(step)
        ms = times["do_bench_median_ms"]
        benchmark.extra_info["do_bench_median_us"] = round(ms * 1e3, 2)
        benchmark.extra_info["do_bench_gbps"] = round(nbytes / (ms * 1e-3) / 1e9, 2)
        if "cudagraph_median_ms" in times:
            benchmark.extra_info["cudagraph_median_us"] = round(times["cudagraph_median_ms"] * 1e3, 2)
        else:
            benchmark.extra_info["cudagraph_error"] = times["cudagraph_error"]


def _backend(provider: str) -> str:
    if provider == "triton" and not CUDA:
        pytest.skip("triton runs on CUDA only here (the CPU interpreter is not timed)")
    return provider


def _bench(benchmark, step, nbytes: int) -> None:
    step()  # warm-up: compilation, allocator
    if CUDA:
        torch.cuda.synchronize()

    def timed():
        out = step()
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(timed, rounds=20, iterations=5, warmup_rounds=1)
    _record(benchmark, nbytes, step)


# ------------------------------------------------------------------------------------------- builders


def build_select_step(provider: str, N: int, k: int):
    """One stage: keep = gumbel_select(log_probs, prev_keep); (idx, kept) = slot_topk_gather(keep scores, x)."""
    torch.manual_seed(0)
    log_probs = torch.randn(B, N, 2, device=DEVICE).log_softmax(-1).to(DTYPE)
    prev_keep = torch.ones(B, N, device=DEVICE, dtype=DTYPE)
    x = torch.randn(B, N, D, device=DEVICE, dtype=DTYPE)
    # Noise from the device's default generator (seeded above): the reference draws (B, N, 2) samples, the
    # kernel a (1,) seed tensor it reads in-kernel. Both are capturable, and a replay draws afresh.

    def step():
        keep = gumbel_select(log_probs, prev_keep, backend=provider)
        return keep, slot_topk_gather(log_probs[..., 0], x, SLOTS, k, backend=provider)

    return step


def build_scatter_step(provider: str, N: int, k: int):
    torch.manual_seed(0)
    idx = torch.rand(B, N, device=DEVICE).reshape(B, SLOTS, N // SLOTS).topk(k, dim=-1).indices.sort(-1).values
    idx = (idx + torch.arange(SLOTS, device=DEVICE).reshape(1, SLOTS, 1) * (N // SLOTS)).reshape(B, SLOTS * k)
    kept = gather_tokens_ref(torch.randn(B, N, D, device=DEVICE, dtype=DTYPE), idx)
    return lambda: scatter_tokens(kept, idx, N, backend=provider)


def build_pool_step(provider: str, N: int):
    torch.manual_seed(0)
    x = torch.randn(B, N, D, device=DEVICE, dtype=DTYPE)
    keep = (torch.rand(B, N, device=DEVICE) < 0.7).to(DTYPE)
    return lambda: predictor_pool(x, keep, SLOTS, backend=provider)


# ------------------------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("provider", ["reference", "triton"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_select_stage(benchmark, stage, provider):
    N, k = STAGES[stage]
    benchmark.group = f"select+topk+gather B{B}-{stage}-D{D}"
    benchmark.extra_info["target_us_h200"] = TARGET_US
    _bench(benchmark, build_select_step(_backend(provider), N, k), select_bytes(N, k, DTYPE.itemsize))


@pytest.mark.parametrize("provider", ["reference", "triton"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_scatter_back(benchmark, stage, provider):
    N, k = STAGES[stage]
    benchmark.group = f"scatter back B{B}-{stage}-D{D}"
    _bench(benchmark, build_scatter_step(_backend(provider), N, k), scatter_bytes(N, k, DTYPE.itemsize))


@pytest.mark.parametrize("provider", ["reference", "triton"])
@pytest.mark.parametrize("N", [392, 272, 192], ids=["N392", "N272", "N192"])
def test_predictor_pool(benchmark, N, provider):
    benchmark.group = f"predictor pool B{B}-N{N}-D{D}-S{SLOTS}"
    _bench(benchmark, build_pool_step(_backend(provider), N), pool_bytes(N, DTYPE.itemsize))
