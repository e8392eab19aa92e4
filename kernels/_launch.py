"""Host-side helpers shared by the kernel launchers (torch only: importing this does not import triton)."""

from __future__ import annotations

import contextlib

import torch


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
