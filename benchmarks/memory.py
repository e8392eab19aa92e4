"""Peak memory of one call, measured for real.

CUDA: torch.cuda.max_memory_allocated around the call. CPU: PyTorch keeps no peak statistic for its CPU
allocator, so the call runs in a fresh Python process: one warm-up call, then the kernel's peak-RSS
counter is reset (``echo 5 > /proc/self/clear_refs``), the call runs again, and the result is the
peak resident set (VmHWM) minus the resident set just before the call: what the call added at its worst
moment (Linux only). glibc keeps freed heap memory for reuse, which would hide the second call's peak
behind the warm-up's; the subprocess therefore runs with ``MALLOC_MMAP_THRESHOLD_=65536`` and
``MALLOC_TRIM_THRESHOLD_=0``, so every block of 64 KiB or more is its own mapping, returned to the system
when freed, and the resident set follows the live tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

_HARNESS = textwrap.dedent(
    """
    import gc, importlib, json, re, sys
    def status_kib(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+)", f.read()).group(1))
    module, func, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    step = getattr(importlib.import_module(module), func)(**kwargs)
    step()  # warm-up: lazy allocations (optimizer state, thread pools) are not the step's peak
    gc.collect()
    before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    step()
    print(json.dumps({"peak_mib": (status_kib("VmHWM") - before) / 1024}))
    """
)


def cpu_peak_mib(module: str, func: str, **kwargs) -> float:
    """Peak MiB added by ``step()`` where ``step = module.func(**kwargs)``, in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    result = subprocess.run(
        [sys.executable, "-c", _HARNESS, module, func, json.dumps(kwargs)], capture_output=True, text=True,
        check=False, env=env,
    )
    if result.returncode:
        raise RuntimeError(f"memory harness failed for {module}.{func}({kwargs}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def cuda_peak_mib(step) -> float:
    """Peak MiB allocated by ``step()`` on the current CUDA device, above what was allocated before; one
    warm-up call first, as on CPU (optimizer state and .grad buffers are not the step's peak)."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
