"""Compile, before anything is timed, every Triton specialisation the GPU harvest's benchmarks, profile and tile
sweep launch, in parallel worker processes (the GPU machine has 16 cores; Triton compiles on the CPU and caches
to disk, so the timed steps that follow hit the cache).

Each job builds a benchmark's step with the benchmark's own builder (same shapes, dtypes, strides, hence the
same specialisations) and runs it once. Prints one line per job with its seconds (compile + first run) and a
summary with the wall time, which run.sh keeps in machine.txt.

    python benchmarks/gpu/warm.py [--workers 16]
    python benchmarks/gpu/warm.py --plan        # list the jobs (any machine)

The tests compile their own specialisations, in the parallel workers of the test step.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAPER = dict(B=32, H=6, N=392, D=64)


def jobs() -> list[tuple[str, str, str, dict, str]]:
    """(name, module, builder, kwargs, how): how = "call" runs step(), and
    "fwd:BM,BN,W,S" / "bwd:..." runs step() under kernels.policy_attention.use_tiles (the tile sweep)."""
    from stpcore.kernels._tiles import POLICY_TILE_CANDIDATES

    att, tok, mod = "benchmarks.bench_attention", "benchmarks.bench_tokens", "benchmarks.bench_model"
    out = []
    # The most distinct compiles first, so the pool's workers start on different kernels.
    for dtype in ("bf16", "fp16"):
        out.append((f"policy {dtype}", att, "build_policy_step", dict(provider="triton", dtype=dtype, **PAPER), "call"))
    out.append(("phase-2 step B=32", mod, "build_phase2_step", dict(batch=32, provider="auto"), "call"))
    out.append(("inference B=8", mod, "build_inference", dict(batch=8, provider="auto"), "call"))
    for kind in ("equal272", "equal192", "equal128", "var"):
        out.append((f"varlen triton {kind}", att, "build_varlen_step",
                    dict(provider="triton", kind=kind, B=32, H=6, N=392, D=64, dtype="fp16"), "call"))
    for N, k in ((392, 34), (272, 24), (192, 16)):
        out.append((f"select N{N}", tok, "build_select_step", dict(provider="triton", N=N, k=k), "call"))
        out.append((f"scatter N{N}", tok, "build_scatter_step", dict(provider="triton", N=N, k=k), "call"))
        out.append((f"pool N{N}", tok, "build_pool_step", dict(provider="triton", N=N), "call"))
    for pass_, candidates in POLICY_TILE_CANDIDATES.items():
        for tiles in candidates[1:]:  # the first is the default, compiled above
            for dtype in ("bf16", "fp16"):
                out.append((f"tiles {pass_} {tiles} {dtype}", att, "build_policy_step",
                            dict(provider="triton", dtype=dtype, **PAPER), f"{pass_}:{','.join(map(str, tiles))}"))
    return out


def _run_job(job: tuple[str, str, str, dict, str]) -> tuple[str, float, str | None]:
    import importlib

    import torch

    name, module, builder, kwargs, how = job
    start = time.perf_counter()
    try:
        step = getattr(importlib.import_module(module), builder)(**kwargs)
        if how == "call":
            step()
        else:
            from stpcore.kernels.policy_attention import use_tiles

            pass_, _, spec = how.partition(":")
            tiles = tuple(int(x) for x in spec.split(","))
            with use_tiles(**{pass_: tiles}):
                step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - reported; the timed step will show the same failure
        return name, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:300]
    return name, time.perf_counter() - start, None


def _idle_job(job: tuple) -> tuple[str, float, str | None]:
    """A job that only sleeps ``kwargs["seconds"]`` (the pool's own test, without a GPU)."""
    name, _, _, kwargs, _ = job
    time.sleep(kwargs["seconds"])
    return name, kwargs["seconds"], None


def run_pool(todo: list[tuple], workers: int, deadline: float = 0.0, run=None) -> int:
    """Run the jobs on ``workers`` spawned processes; print a line per job and the summary; 0 when all finished
    without error. At ``deadline`` seconds (0: none) the summary is printed and the unfinished jobs' workers are
    terminated. ``run``: the job function (default :func:`_run_job`)."""
    run = run or _run_job
    workers = max(1, min(workers, os.cpu_count() or 1, len(todo)))
    start = time.perf_counter()
    failed, done, total = 0, 0, 0.0
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    pending = {pool.submit(run, job): job[0] for job in todo}
    try:
        while pending:
            left = deadline - (time.perf_counter() - start) if deadline else None
            if left is not None and left <= 0:
                break
            finished, _ = wait(pending, timeout=left, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                try:
                    name, seconds, error = fut.result()
                except Exception as exc:  # noqa: BLE001 - a crashed worker fails its job, not the warm-up
                    name, seconds, error = job, time.perf_counter() - start, f"{type(exc).__name__}: {exc}"[:300]
                done += 1
                total += seconds
                failed += error is not None
                print(f"  warm {name:40} {seconds:6.1f} s" + (f"  FAILED {error}" if error else ""), flush=True)
    finally:
        cut = len(pending)
        # Workers still compiling at the deadline must not go on stealing the CPU from the timed steps.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
    wall = time.perf_counter() - start
    print(f"compile seconds: {done} of {len(todo)} warm-up jobs (Triton compile + first run) finished, "
          f"{total:.1f} s summed over jobs, {wall:.1f} s wall on {workers} workers; {failed} failed"
          + (f"; {cut} not finished at the {deadline:g} s deadline (they compile in their timed step)" if cut
             else ""), flush=True)
    return 1 if failed or cut else 0


_STARTED = time.perf_counter()  # at import: the process's start, for --deadline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds from this process's start: stop waiting then, print the summary of what finished "
                             "(0: no deadline)")
    parser.add_argument("--plan", action="store_true", help="list the jobs and exit")
    args = parser.parse_args(argv)
    todo = jobs()
    if args.plan:
        print(f"warm: {len(todo)} jobs on up to {args.workers} workers")
        for name, module, builder, _kwargs, how in todo:
            print(f"  {name:40} {module}.{builder} {how}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("warm: CUDA is not available; nothing to compile")
        return 1
    # The deadline counts from this process's start: importing torch (cold, with its CUDA libraries) is inside it.
    left = max(1.0, args.deadline - (time.perf_counter() - _STARTED)) if args.deadline else 0.0
    return run_pool(todo, args.workers, left)


if __name__ == "__main__":
    raise SystemExit(main())
