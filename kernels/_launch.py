"""Constants and host-side helpers shared by the kernel modules (torch only: importing this does not import
triton)."""

from __future__ import annotations

import contextlib
import os

import torch

# Triton decides when a kernel module is imported (at its @triton.jit definitions) whether those functions run in
# its interpreter. The first kernel module imported reads this flag through its import of _launch, at the same
# point, and every module picks its interpreter branches by it: set TRITON_INTERPRET before importing any of them.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the computing kernels take (no fp64 dots)
HEAD_DIMS = (16, 32, 64, 128)  # what the attention kernels take: tl.dot wants power-of-two sizes of at least 16
LOG2E = 1.4426950408889634  # attention scores are kept in log2 units so every exponential is one exp2
MAX_GRID_Y = 65535  # CUDA's limit on grid dimension 1, where the attention kernels put b * H + h


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current for the launches inside the ``with`` block (a no-op for CPU tensors).

    Triton launches on torch's current CUDA device and stream, which need not be the device of the
    tensors: with several GPUs, a launch for tensors on cuda:1 while cuda:0 is current would run on
    cuda:0 with cuda:1's pointers (an illegal memory access).
    """
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def tf32_enabled() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32, read through whichever API was used to set it.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision``; once that is set, reading the legacy
    ``allow_tf32`` raises ("mix of the legacy and new APIs"), so the new flag is read first ("none"
    inherits the global ``torch.backends.fp32_precision``), and the legacy one only when neither says. If
    even that raises (the two APIs left disagreeing), fp32 stays IEEE: the accurate choice.
    """
    matmul = torch.backends.cuda.matmul
    for precision in (getattr(matmul, "fp32_precision", "none"), getattr(torch.backends, "fp32_precision", "none")):
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for operands of ``dtype``: fp32 follows torch's own TF32 switch for matmuls."""
    if dtype == torch.float32 and not tf32_enabled():
        return "ieee"
    return "tf32"


def interpreter_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """The reason, if any, that Triton's CPU interpreter cannot run these tensors: it has no bf16."""
    if INTERPRET and any(t is not None and t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors):
        return ["bf16 is not supported by Triton's CPU interpreter"]
    return []
