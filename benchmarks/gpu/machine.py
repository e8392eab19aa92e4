"""What the GPU harvest ran on: GPU, driver, versions (torch, triton, CUDA, cuDNN), device properties, the
stpcore commit where known, and ``stpcore info``. Prints to stdout (run.sh's machine step keeps it in
machine.txt); runs on any machine (without CUDA it says so).

    python benchmarks/gpu/machine.py
"""

from __future__ import annotations

import datetime
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], quiet: bool = False) -> str:
    """The command's output; with ``quiet``, "" when it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "" if quiet else f"({argv[0]}: {exc})"
    if quiet and proc.returncode:
        return ""
    return (proc.stdout + proc.stderr).strip()


def main() -> int:
    import torch

    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"stpcore commit: {_run(['git', 'rev-parse', 'HEAD'], quiet=True) or 'unknown (no .git here)'}")
    print(f"python {platform.python_version()}, {platform.platform()}")
    print(f"cpu: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'absent'}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as exc:
        print(f"triton: not importable ({exc})")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
        print(_run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                    "--format=csv"]))
        print(f"tf32 matmul: {torch.backends.cuda.matmul.allow_tf32}")
    else:
        print("gpu: none (CUDA is not available here)")
    print("\nstpcore info:")
    print(_run([sys.executable, "-m", "stpcore", "info"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
