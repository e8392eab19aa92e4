"""Two commits measured alternately on one machine: did a change slow anything down?

    .venv/bin/python benchmarks/ab.py OLD_REF [NEW_REF] [--rounds 5] [--json OUT.json]

Each commit is checked out into its own temporary git worktree (NEW_REF defaults to the working tree itself).
Every round runs each workload once per commit, the two commits in alternating order, each run in a fresh
process of this interpreter with the commit's tree first on ``sys.path`` (so ``stpcore`` and the benchmark
builders are that commit's). A workload times ``repeats`` calls of one step after a warm-up and keeps the
median. The figure per workload is the median over rounds of the per-round ratio new speed / old speed
(old time / new time): above 1 the new commit is faster. The machine's CPU flags are printed with it.

Workloads: the whole model from benchmarks/bench_model.py (inference B=8 masked and gathered, the phase-1
and phase-2 steps at B=4), and the PyAV data path (an epoch of 16x112x112 clips from 320x240 VP9 videos,
2 workers) on a synthetic dataset written once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (python statements defining step(), repeats)
WORKLOADS: dict[str, tuple[str, int]] = {
    "inference B=8 (gathered)": ("from benchmarks.bench_model import build_inference\n"
                                 "step = build_inference(batch=8, provider='auto', device='cpu')", 5),
    "inference B=8 (masked)": ("from benchmarks.bench_model import build_inference\n"
                               "step = build_inference(batch=8, provider='masked', device='cpu')", 3),
    "phase-1 step B=4": ("from benchmarks.bench_model import build_train_step\n"
                         "step = build_train_step(batch=4, provider='auto', device='cpu')", 3),
    "phase-2 step B=4": ("from benchmarks.bench_model import build_phase2_step\n"
                         "step = build_phase2_step(batch=4, provider='auto', device='cpu')", 2),
    "PyAV epoch of 16 videos": ("from stpcore.data.loader import DataConfig, get_loader\n"
                              "cfg = DataConfig(root=DATA, batch_size=8, workers=2, decoder='pyav', device='cpu')\n"
                              "def step():\n"
                              "    return sum(len(b) for b in get_loader(cfg))", 3),
}

RUNNER = textwrap.dedent(
    """
    import json, statistics, sys, time
    sys.path.insert(0, TREE)
    import os
    os.environ.pop("STPCORE_BACKEND", None)
    {setup}
    step()  # warm-up
    times = []
    for _ in range({repeats}):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(statistics.median(times)))
    """
)


def _worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(where), ref], check=True)
    return where


def _time(tree: Path, name: str, data: Path) -> float:
    setup, repeats = WORKLOADS[name]
    code = f"TREE = {str(tree)!r}\nDATA = {str(data)!r}\n" + RUNNER.format(setup=setup, repeats=repeats)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree)
    if out.returncode:
        raise RuntimeError(f"{name} at {tree}: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in flags.split() if f in wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the commit to compare against")
    parser.add_argument("new", nargs="?", help="the new commit (default: this working tree)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", help="comma-separated workload names (default: all)")
    parser.add_argument("--json", type=Path, help="write the per-round times and ratios here")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(WORKLOADS)
    with tempfile.TemporaryDirectory(prefix="stpcore-ab-") as tmp:
        tmp = Path(tmp)
        old = _worktree(args.old, tmp / "old")
        new = _worktree(args.new, tmp / "new") if args.new else ROOT
        try:
            data = tmp / "data"
            sys.path.insert(0, str(ROOT))
            from stpcore.data.synth import make_synthetic_dataset

            make_synthetic_dataset(data, videos=16, seed=0, codec="vp9", width=320, height=240, frames=40)
            import torch

            # torch's intra-op threads, as the timed child processes (same environment) get them; os.cpu_count()
            # counts logical CPUs, which torch does not all use.
            result: dict = {"old": args.old, "new": args.new or "working tree", "cpu_flags": cpu_flags(),
                            "threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(), "workloads": {}}
            for name in names:
                rows = []
                for r in range(args.rounds):
                    order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
                    times = {label: _time(tree, name, data) for label, tree in order}
                    rows.append({**times, "ratio": times["old"] / times["new"]})
                ratio = statistics.median(r["ratio"] for r in rows)
                result["workloads"][name] = {"rounds": rows, "median_ratio": round(ratio, 3)}
                print(f"{name:28} old {statistics.median(r['old'] for r in rows):.3f} s  new "
                      f"{statistics.median(r['new'] for r in rows):.3f} s  new/old speed {ratio:.3f}", flush=True)
            print(f"cpu flags: {result['cpu_flags']}")
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
        finally:
            for tree in (old, new):
                if tree != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                                   check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
