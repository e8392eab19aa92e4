"""GPU timings shared by the kernel benchmarks: the eager launch path and a CUDA-graph replay of it.

Each step is timed twice with Triton's timers (medians):

- ``do_bench_median_ms``: ``triton.testing.do_bench`` (eager: Python dispatch and kernel launches included
  wherever the GPU waits on them), with ``grad_to_none`` so gradients are not accumulated between calls;
- ``cudagraph_median_ms``: ``triton.testing.do_bench_cudagraph``, the same step captured in a CUDA graph and
  replayed, which leaves the GPU time alone. A step that cannot be captured (a host sync inside, say) records
  ``cudagraph_error`` instead.

Only called where CUDA exists; importing this module does not import triton.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def gpu_times(step: Callable, grad_to_none: Sequence[torch.Tensor] | None = None) -> dict:
    """{"do_bench_median_ms", "cudagraph_median_ms" or "cudagraph_error"} of ``step``.

    Args:
        step: the eager step.
        grad_to_none: leaf tensors whose .grad is reset before each call.
    """
    import triton.testing

    out: dict = {}
    grads = list(grad_to_none) if grad_to_none else None
    ms = triton.testing.do_bench(step, grad_to_none=grads, return_mode="median")
    out["do_bench_median_ms"] = round(ms, 5)
    try:
        graph_ms = triton.testing.do_bench_cudagraph(step, grad_to_none=grads, return_mode="median")
        out["cudagraph_median_ms"] = round(graph_ms, 5)
    except Exception as exc:  # noqa: BLE001 - recorded beside the eager figure, which stands on its own
        out["cudagraph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        torch.cuda.synchronize()
    return out
