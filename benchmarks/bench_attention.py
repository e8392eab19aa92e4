"""Attention benchmarks: policy attention forward + backward, and varlen attention over kept tokens.

    .venv/bin/python -m pytest benchmarks/bench_attention.py --benchmark-only            # a real run
    .venv/bin/python -m pytest benchmarks/bench_attention.py --benchmark-disable -q      # smoke: each case once
    .venv/bin/python -m pytest benchmarks/bench_attention.py --benchmark-only -k cpu_target   # the CPU target

Providers (each skips with its reason where it cannot run):

- ``reference``: ``policy_attention_ref`` / ``varlen_attention_ref`` (the direct PyTorch formulation);
- ``chunked``: ``policy_attention_chunked``, the CPU path (query chunks, closed-form backward);
- ``triton``: the fused kernels in ``stpcore.kernels`` (CUDA only here: the interpreter is far too slow);
- ``xformers`` (CUDA, varlen, when installed): xformers' memory-efficient attention with its block-diagonal
  mask, the dispatch backend for users who already have xformers;
- ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient`` (CUDA): ``F.scaled_dot_product_attention`` without a
  policy, pinned to one backend each with ``torch.nn.attention.sdpa_kernel`` (each skips where that backend
  cannot run the inputs): the speed to match, judged against the fastest of them; for varlen, on the gathered
  dense (B, H, L, D) batch, so equal lengths only;
- ``flex`` (CUDA): ``flex_attention`` with a score_mod adding log(policy_j) off the diagonal. It differs from
  policy attention in the eps terms (no eps / N smoothing, no eps in the denominator, and its max is over
  visible keys only), so it is a speed comparison, not an equivalent.

Shapes: the paper's B=32, H=6, N=392, D=64 (CUDA; on CPU the reference takes too long for a smoke run),
a small shape every provider runs on CPU, and the CPU target of the issue: reference vs chunked forward +
backward at B=4, H=6, N=392, D=64 with the peak memory of one step in ``extra_info["peak_mib"]``
(CPU: VmHWM - VmRSS of a fresh process around the step, see benchmarks/memory.py, so it sees torch's own
allocations; CUDA: torch.cuda.max_memory_allocated). Varlen: kept lengths 272, 192 and 128 out of 392
(equal lengths, B=32), and variable 30-70% keep sets.

``extra_info``: TFLOP/s and GB/s from the explicit counts below and the mean time, and on CUDA the medians of
``triton.testing.do_bench`` (eager, gradients reset between calls) and of ``do_bench_cudagraph`` (the same
step replayed from a CUDA graph: GPU time without the host's launch cost), see benchmarks/timing.py.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.memory import cpu_peak_default_mib, cpu_peak_mib, cuda_peak_mib
from benchmarks.timing import gpu_times
from stpcore.ops.policy_attention import policy_attention, policy_attention_chunked, policy_attention_ref
from stpcore.ops.varlen_attention import varlen_attention, varlen_attention_ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SDPA_BACKENDS = ("flash", "cudnn", "efficient")
SDPA_PROVIDERS = [f"sdpa_{name}" for name in SDPA_BACKENDS]
GPU_ONLY = {"triton", "flex", "xformers", *SDPA_PROVIDERS}


# ------------------------------------------------------------------------------------------- counts


def attention_flops(seq_sq_sum: int, H: int, D: int, backward: bool) -> float:
    """Matmul FLOPs of softmax attention over sequences with sum_b L_b^2 = ``seq_sq_sum``.

    Forward: S = q k^T and out = A v, 2 L^2 D each. Backward (FlashAttention-2's count): dv, dP, dq, dk and
    the recomputed S, 2.5 x the forward. Elementwise work (exp, the policy, eps terms) is not counted.
    """
    fwd = 4.0 * H * D * seq_sq_sum
    return fwd * 3.5 if backward else fwd


def attention_bytes(tokens: int, H: int, D: int, elem: int, backward: bool) -> float:
    """Least memory traffic of fused attention over ``tokens`` rows: the (tokens, H, D) tensors moved once.

    Forward reads q, k, v and writes out (4 tensors); backward reads q, k, v, out, dO and writes dq, dk, dv
    (8 more). The (B, N) policy and the O(tokens H) row statistics are negligible and not counted.
    """
    return (4 + (8 if backward else 0)) * tokens * H * D * elem


def _record(benchmark, flops: float, nbytes: float, step=None, peak_mib: float | None = None) -> None:
    stats = getattr(benchmark, "stats", None)
    mean = stats.stats.mean if stats is not None else None
    if mean:
        benchmark.extra_info["tflops"] = round(flops / mean / 1e12, 4)
        benchmark.extra_info["gbps"] = round(nbytes / mean / 1e9, 2)
    if CUDA and step is not None and mean:
        times = gpu_times(step, grad_to_none=getattr(step, "grads", None))
        benchmark.extra_info.update(times)
        ms = times["do_bench_median_ms"]
        benchmark.extra_info["do_bench_tflops"] = round(flops / (ms * 1e-3) / 1e12, 4)
        if "cudagraph_median_ms" in times:
            benchmark.extra_info["cudagraph_tflops"] = round(flops / (times["cudagraph_median_ms"] * 1e-3) / 1e12, 4)
    if peak_mib is not None:
        benchmark.extra_info["peak_mib"] = round(peak_mib, 1)
    benchmark.extra_info["device"] = DEVICE
    benchmark.extra_info["threads"] = torch.get_num_threads()


def _skip_unavailable(provider: str) -> None:
    if provider in GPU_ONLY and not CUDA:
        pytest.skip(f"{provider} runs on CUDA only")


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _sdpa(provider: str):
    """F.scaled_dot_product_attention pinned to one backend ("sdpa_flash", ...): no fallback to another."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[provider]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _warm_up(step, provider: str):
    """Run ``step`` once (compilation, allocator); an SDPA backend that cannot run these inputs skips."""
    try:
        return step()
    except RuntimeError as exc:
        if provider.startswith("sdpa_"):
            pytest.skip(f"{provider} cannot run these inputs here: {str(exc).splitlines()[0][:200]}")
        raise


# ---------------------------------------------------------------------------------- policy attention


def _flex_policy_attention():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def run(q, k, v, policy):
        log_policy = policy.log()  # (B, N); log 0 = -inf hides a key, except on the diagonal

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(q_idx == kv_idx, score, score + log_policy[b, kv_idx])

        return compiled(q, k, v, score_mod=score_mod)

    return run


def _policy_fn(provider: str):
    if provider == "reference":
        return policy_attention_ref
    if provider == "chunked":
        return policy_attention_chunked
    if provider == "triton":
        return lambda q, k, v, p: policy_attention(q, k, v, p, backend="triton")
    if provider.startswith("sdpa_"):
        sdpa = _sdpa(provider)
        return lambda q, k, v, p: sdpa(q, k, v)
    if provider == "flex":
        return _flex_policy_attention()
    raise ValueError(f"unknown provider {provider!r}")


def build_policy_step(provider: str, B: int, H: int, N: int, D: int, dtype: str = "fp32", keep: float = 0.7,
                      device: str = DEVICE):
    """A callable running one forward + backward of policy attention (B, H, N, D) with a 0/1 policy."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=_dtype(dtype), requires_grad=True) for _ in range(3))
    policy = (torch.rand(B, N, device=device) < keep).float().requires_grad_()
    dout = torch.randn(B, H, N, D, device=device, dtype=_dtype(dtype))
    fn = _policy_fn(provider)

    def step():
        out = fn(q, k, v, policy)
        out.backward(dout)
        return out

    step.grads = [q, k, v, policy]  # reset between timed calls (benchmarks/timing.py)
    return step


POLICY_SHAPES = {
    # name: (B, H, N, D, dtype, needs CUDA)
    "paper B32-H6-N392-D64-bf16": (32, 6, 392, 64, "bf16", True),
    "paper B32-H6-N392-D64-fp16": (32, 6, 392, 64, "fp16", True),
    "small B2-H6-N196-D64-fp32": (2, 6, 196, 64, "fp32", False),
}


@pytest.mark.parametrize("provider", ["reference", "chunked", "triton", *SDPA_PROVIDERS, "flex"])
@pytest.mark.parametrize("shape", list(POLICY_SHAPES))
def test_policy_attention_fwd_bwd(benchmark, shape, provider):
    B, H, N, D, dtype, needs_cuda = POLICY_SHAPES[shape]
    _skip_unavailable(provider)
    if needs_cuda and not CUDA:
        pytest.skip("the paper shape runs on CUDA (too slow for the CPU reference in a smoke run)")
    benchmark.group = f"policy attention fwd+bwd {shape}"
    step = build_policy_step(provider, B, H, N, D, dtype)
    _warm_up(step, provider)  # compilation, allocator
    benchmark.pedantic(step, rounds=5, iterations=1)
    elem = _dtype(dtype).itemsize
    _record(benchmark, attention_flops(B * N * N, H, D, True), attention_bytes(B * N, H, D, elem, True), step)


@pytest.mark.parametrize("provider", ["reference", "chunked"])
def test_policy_attention_cpu_target(benchmark, provider):
    """The issue's CPU target: direct vs chunked forward + backward, time and peak memory."""
    B, H, N, D = 4, 6, 392, 64
    benchmark.group = "policy attention fwd+bwd cpu target B4-H6-N392-D64-fp32"
    step = build_policy_step(provider, B, H, N, D, "fp32")
    step()
    benchmark.pedantic(step, rounds=3, iterations=1)
    if CUDA:
        peak = cuda_peak_mib(step)
    else:
        where = ("benchmarks.bench_attention", "build_policy_step")
        shape = dict(provider=provider, B=B, H=H, N=N, D=D, device="cpu")
        peak = cpu_peak_mib(*where, **shape)
        first, later = cpu_peak_default_mib(*where, **shape)
        benchmark.extra_info.update(peak_mib_default_first=round(first, 1), peak_mib_default_later=round(later, 1))
    _record(benchmark, attention_flops(B * N * N, H, D, True), attention_bytes(B * N, H, D, 4, True), peak_mib=peak)


# ----------------------------------------------------------------------------------- varlen attention


def _lengths(kind: str, B: int, N: int) -> list[int]:
    """Kept lengths per video: "equal<L>" or "var" (30% to 70% of N, spread evenly over the batch)."""
    if kind.startswith("equal"):
        return [int(kind[5:])] * B
    return [round(N * (0.3 + 0.4 * i / max(1, B - 1))) for i in range(B)]


def build_varlen_step(provider: str, kind: str, B: int, H: int, N: int, D: int, dtype: str = "fp16",
                      device: str = DEVICE):
    """A callable running one forward + backward of attention over the kept tokens of B videos of N tokens."""
    torch.manual_seed(0)
    lengths = _lengths(kind, B, N)
    dt = _dtype(dtype)
    # Unpacked tokens (B * N, H, D) and the kept rows of each video, as the sparsifier produces them.
    q, k, v = (torch.randn(B * N, H, D, device=device, dtype=dt, requires_grad=True) for _ in range(3))
    kept = [b * N + torch.randperm(N, device=device)[:n].sort().values for b, n in enumerate(lengths)]
    indices = torch.cat(kept)  # (total,) int64
    cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    max_len = max(lengths)
    dout = torch.randn(indices.numel(), H, D, device=device, dtype=dt)

    if provider.startswith("sdpa_"):
        if len(set(lengths)) != 1:
            raise ValueError("sdpa runs the gathered dense batch: equal lengths only")
        sdpa = _sdpa(provider)

        def forward():
            L = lengths[0]
            dense = [t[indices].view(B, L, H, D).transpose(1, 2) for t in (q, k, v)]  # (B, H, L, D)
            return sdpa(*dense).transpose(1, 2).reshape(B * L, H, D)
    else:
        named = {"reference": varlen_attention_ref,
                 "triton": lambda *a: varlen_attention(*a, backend="triton"),
                 "xformers": lambda *a: varlen_attention(*a, backend="xformers")}
        fn = named[provider]

        def forward():
            return fn(q[indices], k[indices], v[indices], cu, max_len)

    def step():
        out = forward()
        out.backward(dout)
        return out

    step.grads = [q, k, v]
    return step


VARLEN_SHAPES = {
    # name: (kind, B, H, N, D, dtype, needs CUDA)
    "keep272 B32-H6-N392-D64-fp16": ("equal272", 32, 6, 392, 64, "fp16", True),
    "keep192 B32-H6-N392-D64-fp16": ("equal192", 32, 6, 392, 64, "fp16", True),
    "keep128 B32-H6-N392-D64-fp16": ("equal128", 32, 6, 392, 64, "fp16", True),
    "keep30-70% B32-H6-N392-D64-fp16": ("var", 32, 6, 392, 64, "fp16", True),
    "small keep30-70% B4-H6-N196-D64-fp32": ("var", 4, 6, 196, 64, "fp32", False),
}


@pytest.mark.parametrize("provider", ["reference", "triton", *SDPA_PROVIDERS, "xformers"])
@pytest.mark.parametrize("shape", list(VARLEN_SHAPES))
def test_varlen_attention_fwd_bwd(benchmark, shape, provider):
    kind, B, H, N, D, dtype, needs_cuda = VARLEN_SHAPES[shape]
    _skip_unavailable(provider)
    if provider == "xformers" and importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed (optional extra stpcore[xformers])")
    if needs_cuda and not CUDA:
        pytest.skip("B=32 shapes run on CUDA")
    if provider.startswith("sdpa_") and not kind.startswith("equal"):
        pytest.skip("sdpa needs equal lengths (dense batch)")
    benchmark.group = f"varlen attention fwd+bwd {shape}"
    step = build_varlen_step(provider, kind, B, H, N, D, dtype)
    _warm_up(step, provider)
    benchmark.pedantic(step, rounds=5, iterations=1)
    lengths = _lengths(kind, B, N)
    sq = sum(n * n for n in lengths)
    total = sum(lengths)
    elem = _dtype(dtype).itemsize
    _record(benchmark, attention_flops(sq, H, D, True), attention_bytes(total, H, D, elem, True), step)


def test_counts():
    """The FLOP/byte formulas on a hand-checked case (cheap; not a timing)."""
    assert attention_flops(2 * 3 * 3, 1, 4, False) == 4 * 4 * 18
    assert math.isclose(attention_flops(9, 2, 8, True), 3.5 * 4 * 2 * 8 * 9)
    assert attention_bytes(10, 2, 8, 2, False) == 4 * 10 * 2 * 8 * 2
    assert attention_bytes(10, 2, 8, 2, True) == 12 * 10 * 2 * 8 * 2
    assert _lengths("equal5", 3, 10) == [5, 5, 5]
    assert _lengths("var", 3, 100) == [30, 50, 70]
