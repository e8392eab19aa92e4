"""Summarise a pytest-benchmark JSON file as the GPU table: op, shape, ms, TFLOP/s, % of the ceilings,
speedup over the reference and over sdpa.

    python benchmarks/gpu/table.py RESULTS.json [--markdown]

Ceilings measured on this project's H200 (see the device notes): 790 TFLOP/s dense bf16, 4.3 TB/s copy.
Time is the do_bench median where the benchmark recorded one (CUDA), else pytest-benchmark's median.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

PEAK_TFLOPS = 790.0
PEAK_GBPS = 4300.0


def rows(data: dict) -> list[dict]:
    out = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        ms = info.get("do_bench_median_ms") or b["stats"]["median"] * 1e3
        tflops = info.get("do_bench_tflops") or info.get("tflops")
        gbps = info.get("gbps")
        if gbps is not None and info.get("do_bench_median_ms") and b["stats"]["mean"]:
            gbps = gbps * b["stats"]["mean"] * 1e3 / info["do_bench_median_ms"]  # rescale to the do_bench time
        params = b.get("params") or {}
        out.append({
            "group": b.get("group") or b["name"],
            "provider": params.get("provider", b["name"].split("[")[-1].rstrip("]")),
            "ms": ms,
            "tflops": tflops,
            "gbps": gbps,
            "peak_mib": info.get("peak_mib"),
            "clips_per_s": info.get("clips_per_s"),
        })
    return out


def table(data: dict) -> str:
    by_group: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows(data):
        by_group[r["group"]][r["provider"]] = r
    lines = [
        "| op / shape | provider | ms | TFLOP/s | % of 790 | GB/s | % of 4.3 TB/s | x reference | x sdpa | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    for group, providers in by_group.items():
        ref, sdpa = providers.get("reference"), providers.get("sdpa")
        for name, r in providers.items():
            lines.append(
                f"| {group} | {name} | {r['ms']:.4f} | {fmt(r['tflops'], '.1f')} | "
                f"{fmt(r['tflops'] and 100 * r['tflops'] / PEAK_TFLOPS, '.1f')} | {fmt(r['gbps'], '.0f')} | "
                f"{fmt(r['gbps'] and 100 * r['gbps'] / PEAK_GBPS, '.1f')} | "
                f"{fmt(ref and ref['ms'] / r['ms'], '.2f')} | {fmt(sdpa and sdpa['ms'] / r['ms'], '.2f')} | "
                f"{fmt(r['peak_mib'], '.0f')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark --benchmark-json output")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        print(table(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
