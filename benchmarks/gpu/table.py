"""Summarise pytest-benchmark JSON files as the GPU table, then check the issue's GPU targets.

    python benchmarks/gpu/table.py RESULTS.json [MORE.json ...]

Table columns: op / shape, provider, ms, TFLOP/s and % of 790 (dense bf16), GB/s and % of 4.3 TB/s (copy
ceiling measured on this project's H200), speedup over the ``reference`` and over ``sdpa`` providers of the
same group, peak MiB. Time is the ``triton.testing.do_bench`` median where the benchmark recorded one
(``do_bench_median_ms`` or ``do_bench_median_us``), else pytest-benchmark's median.

Targets (whole model, vit_small, bf16 on CUDA):
- phase-2 training step at B=32: ``auto`` at least 3x the ``reference`` throughput, at most 1/3 of its
  peak memory;
- inference at the paper's keep ratio: ``auto`` at least 3x, against ``reference`` and against ``masked``
  (every token computed, the dropped ones masked: inference without token dropping).
A file that is missing or unreadable is reported and skipped; a target whose rows are absent is reported as
"not measured".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

PEAK_TFLOPS = 790.0
PEAK_GBPS = 4300.0


def _do_bench_ms(info: dict) -> float | None:
    if info.get("do_bench_median_ms"):
        return float(info["do_bench_median_ms"])
    if info.get("do_bench_median_us"):
        return float(info["do_bench_median_us"]) / 1e3
    return None


def rows(data: dict) -> list[dict]:
    out = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        stats = b.get("stats") or {}
        bench_ms = _do_bench_ms(info)
        ms = bench_ms if bench_ms is not None else stats.get("median", float("nan")) * 1e3
        tflops = info.get("do_bench_tflops") or info.get("tflops")
        gbps = info.get("do_bench_gbps") or info.get("gbps")
        if gbps is not None and not info.get("do_bench_gbps") and bench_ms and stats.get("mean"):
            gbps = gbps * stats["mean"] * 1e3 / bench_ms  # rescale to the do_bench time
        params = b.get("params") or {}
        out.append({
            "group": b.get("group") or b["name"],
            "provider": params.get("provider", b["name"].split("[")[-1].rstrip("]")),
            "ms": ms,
            "tflops": tflops,
            "gbps": gbps,
            "peak_mib": info.get("peak_mib"),
        })
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(all_rows: list[dict]) -> str:
    by_group: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in all_rows:
        by_group[r["group"]][r["provider"]] = r
    lines = [
        "| op / shape | provider | ms | TFLOP/s | % of 790 | GB/s | % of 4.3 TB/s | x reference | x sdpa | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, providers in by_group.items():
        ref, sdpa = providers.get("reference"), providers.get("sdpa")
        for name, r in providers.items():
            lines.append(
                f"| {group} | {name} | {r['ms']:.4f} | {_fmt(r['tflops'], '.1f')} | "
                f"{_fmt(r['tflops'] and 100 * r['tflops'] / PEAK_TFLOPS, '.1f')} | {_fmt(r['gbps'], '.0f')} | "
                f"{_fmt(r['gbps'] and 100 * r['gbps'] / PEAK_GBPS, '.1f')} | "
                f"{_fmt(ref and ref['ms'] / r['ms'], '.2f')} | {_fmt(sdpa and sdpa['ms'] / r['ms'], '.2f')} | "
                f"{_fmt(r['peak_mib'], '.0f')} |"
            )
    return "\n".join(lines)


def targets(all_rows: list[dict]) -> str:
    """One line per GPU target of the issue: the measured ratio and PASS / MISS, or "not measured"."""
    by_group: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in all_rows:
        by_group[r["group"]][r["provider"]] = r

    def find(words: tuple[str, ...]) -> dict[str, dict] | None:
        return next((p for g, p in by_group.items() if all(w in g for w in words)), None)

    def speed(group, base: str, goal: float, what: str) -> str:
        if not group or base not in group or "auto" not in group:
            return f"- {what}: not measured"
        ratio = group[base]["ms"] / group["auto"]["ms"]
        return f"- {what}: {ratio:.2f}x ({'PASS' if ratio >= goal else 'MISS'}, target >= {goal:g}x)"

    def memory(group, what: str) -> str:
        if not group or any(group.get(p, {}).get("peak_mib") is None for p in ("reference", "auto")):
            return f"- {what}: not measured"
        ratio = group["auto"]["peak_mib"] / group["reference"]["peak_mib"]
        return f"- {what}: {ratio:.2f} of the reference ({'PASS' if ratio <= 1 / 3 else 'MISS'}, target <= 0.33)"

    phase2 = find(("phase-2 step", "B=32"))
    inference = find(("inference",))
    return "\n".join([
        "GPU targets (auto = Triton kernels):",
        speed(phase2, "reference", 3.0, "phase-2 step B=32 throughput vs reference"),
        memory(phase2, "phase-2 step B=32 peak memory"),
        speed(inference, "reference", 3.0, "inference vs reference (both gather the kept tokens)"),
        speed(inference, "masked", 3.0, "inference vs masked (every token computed)"),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json outputs")
    args = parser.parse_args(argv)
    all_rows: list[dict] = []
    for path in args.json:
        try:
            with open(path) as f:
                all_rows += rows(json.load(f))
        except (OSError, ValueError) as exc:
            print(f"(skipped {path}: {exc})", file=sys.stderr)
    if not all_rows:
        print("no benchmark results to show")
        return 1
    print(table(all_rows))
    print()
    print(targets(all_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
