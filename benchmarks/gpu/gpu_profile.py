"""torch.profiler kernel tables for the GPU harvest: one policy-attention forward + backward (the Triton kernels,
the paper's bf16 shape) and one phase-2 step (vit_small, B=32, bf16, dispatch's choice). Each is run three
times to warm up, then once under the profiler; prints the top kernels by CUDA time (run.sh keeps it in
profile.txt).

    python benchmarks/gpu/gpu_profile.py
    python benchmarks/gpu/gpu_profile.py --plan     # what it would profile (any machine)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = [
    ("policy attention fwd+bwd, triton, B32-H6-N392-D64 bf16", "benchmarks.bench_attention", "build_policy_step",
     dict(provider="triton", B=32, H=6, N=392, D=64, dtype="bf16"), 15),
    ("phase-2 step (STPrivacy + both recognizers), auto, vit_small B=32 bf16", "benchmarks.bench_model",
     "build_phase2_step", dict(batch=32, provider="auto"), 30),
]


def profile_table(step, rows: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", action="store_true")
    args = parser.parse_args(argv)
    if args.plan:
        for title, module, builder, _kwargs, rows in SECTIONS:
            print(f"profile: {title} ({module}.{builder}, top {rows} by CUDA time)")
        return 0
    import importlib

    import torch

    if not torch.cuda.is_available():
        print("profile: CUDA is not available")
        return 1
    failed = 0
    for title, module, builder, kwargs, rows in SECTIONS:
        print(f"\n=== {title}", flush=True)
        try:
            print(profile_table(getattr(importlib.import_module(module), builder)(**kwargs), rows), flush=True)
        except Exception as exc:  # noqa: BLE001 - the next section still runs
            failed += 1
            print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
