"""Peak memory of one call, measured for real, two ways on CPU.

CUDA: torch.cuda.max_memory_allocated around the call (after one warm-up call).

CPU: PyTorch keeps no peak statistic for its CPU allocator, so the call runs in a fresh Python process and
the kernel's peak-RSS counter is read around it (reset with ``echo 5 > /proc/self/clear_refs``; the figure
is the peak resident set (VmHWM) minus the resident set just before the call: what the call added at its
worst moment; Linux only). glibc keeps freed heap memory for reuse, which hides a later call's peak behind
an earlier one's, so there are two methods, and each figure says which it used:

- ``tuned`` (:func:`cpu_peak_mib`): the process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` and
  ``MALLOC_TRIM_THRESHOLD_=0``, so every block of 64 KiB or more is its own mapping, returned to the
  system when freed, and the resident set follows the live tensors. One warm-up call, then the measured
  one. This isolates what the call itself allocates.
- ``default`` (:func:`cpu_peak_default_mib`): glibc's defaults, what a user's process sees. The first
  call (lazy allocations, thread pools and glibc's arenas included) and the largest of three later calls
  (which reuse the memory glibc kept, so they can add anything from 0 up).
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
    def peak(step):
        gc.collect()
        before = status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        step()
        return (status_kib("VmHWM") - before) / 1024
    module, func, method, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    step = getattr(importlib.import_module(module), func)(**kwargs)
    if method == "tuned":
        step()  # warm-up: lazy allocations (optimizer state, thread pools) are not the step's peak
        print(json.dumps({"peak_mib": peak(step)}))
    else:
        first = peak(step)
        later = [peak(step) for _ in range(3)]
        print(json.dumps({"first_mib": first, "later_mib": later}))
    """
)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _harness(module: str, func: str, method: str, kwargs: dict) -> dict:
    env = dict(os.environ)
    for key in TUNED_MALLOC:
        env.pop(key, None)
    if method == "tuned":
        env.update(TUNED_MALLOC)
    result = subprocess.run(
        [sys.executable, "-c", _HARNESS, module, func, method, json.dumps(kwargs)], capture_output=True, text=True,
        check=False, env=env,
    )
    if result.returncode:
        raise RuntimeError(f"memory harness failed for {module}.{func}({kwargs}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_peak_mib(module: str, func: str, **kwargs) -> float:
    """Peak MiB added by ``step()`` where ``step = module.func(**kwargs)``: the tuned method (module docstring)."""
    return _harness(module, func, "tuned", kwargs)["peak_mib"]


def cpu_peak_default_mib(module: str, func: str, **kwargs) -> tuple[float, float]:
    """(first call, largest of three later calls) peak MiB under glibc's default settings (module docstring)."""
    found = _harness(module, func, "default", kwargs)
    return found["first_mib"], max(found["later_mib"])


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
