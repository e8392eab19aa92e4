"""Summarise pytest-benchmark JSON files as the GPU table, then check every GPU target.

    python benchmarks/gpu/table.py RESULTS.json [MORE.json ...]

Table columns: op / shape, provider, ms (eager), graph ms (CUDA-graph replay, where recorded), TFLOP/s and % of
the GPU's dense bf16 rate, GB/s and % of its copy rate (both measured on this project's machines: H200 790
TFLOP/s and 4.3 TB/s, H100 798 TFLOP/s and 3.0 TB/s; the GPU is named in the JSON's ``machine_info["gpu"]``, by
benchmarks/conftest.py, and on the table's first line), speedup over the ``reference`` provider of the same
group and over the fastest SDPA backend of the group (named), peak MiB.
The eager time is the ``triton.testing.do_bench`` median where the benchmark recorded one
(``do_bench_median_ms`` or ``do_bench_median_us``), else pytest-benchmark's median.

Targets (the kernel and pipeline issues; bf16 on an H200 unless said; on another GPU they are reported as measured
there, with the GPU named):
- policy attention fwd+bwd at B=32, H=6, N=392, D=64: ``triton`` at least 10x the ``reference``, and at most
  1.3x the time of the fastest SDPA backend without a policy (eager times);
- varlen attention fwd+bwd (fp16) on each equal-length batch: ``triton`` at most 1.2x the fastest SDPA backend;
- selection + top-k + gather: ``triton`` under 20 us of GPU time (the CUDA-graph replay) per stage, the eager
  time beside it;
- phase-2 training step at B=32: ``auto`` at least 3x the ``reference`` throughput, at most 1/3 of its
  peak memory;
- inference at the paper's keep ratio: ``auto`` at least 3x, against ``reference`` and against ``masked``
  (every token computed, the dropped ones masked: inference without token dropping).
A file that is missing or unreadable is reported and skipped; a target whose rows are absent is reported as
"not measured". An ``auto`` row whose recorded backends (``extra_info["backends"]``, what dispatch chose) hold no
``triton`` measured PyTorch code, not stpcore's kernels (a Triton that does not import falls back silently): the
targets say so above their verdicts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

# (dense bf16 TFLOP/s, device-to-device copy GB/s counting bytes read and written), measured on this project's
# machines (the device library's KINDS.md); matched by name, the H200's for a GPU not listed.
CEILINGS = {"H200": (790.0, 4300.0), "H100": (798.0, 3000.0)}
SELECT_TARGET_US = 20.0


def ceilings(gpu: str | None) -> tuple[float, float, str]:
    """(TFLOP/s, GB/s, what they are) for a GPU name."""
    for key, (tflops, gbps) in CEILINGS.items():
        if gpu and key in gpu:
            return tflops, gbps, f"{key}: {tflops:.0f} TFLOP/s dense bf16, {gbps / 1e3:.1f} TB/s copy"
    tflops, gbps = CEILINGS["H200"]
    named = f"{gpu or 'GPU not recorded'}: the H200's ceilings"
    return tflops, gbps, f"{named} ({tflops:.0f} TFLOP/s, {gbps / 1e3:.1f} TB/s)"


def gpu_of(all_rows: list[dict]) -> str | None:
    """The GPU the rows were measured on (the most common name; None when no JSON recorded one)."""
    names = [r.get("gpu") for r in all_rows if r.get("gpu")]
    return max(set(names), key=names.count) if names else None


def _ms(info: dict, key: str) -> float | None:
    if info.get(f"{key}_ms"):
        return float(info[f"{key}_ms"])
    if info.get(f"{key}_us"):
        return float(info[f"{key}_us"]) / 1e3
    return None


def rows(data: dict) -> list[dict]:
    out = []
    gpu = (data.get("machine_info") or {}).get("gpu")
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        stats = b.get("stats") or {}
        bench_ms = _ms(info, "do_bench_median")
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
            "graph_ms": _ms(info, "cudagraph_median"),
            "graph_error": info.get("cudagraph_error"),
            "tflops": tflops,
            "gbps": gbps,
            "peak_mib": info.get("peak_mib"),
            "frames_per_s": info.get("frames_per_s"),
            "backends": info.get("backends"),
            "gpu": gpu,
        })
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _groups(all_rows: list[dict]) -> dict[str, dict[str, dict]]:
    by_group: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in all_rows:
        by_group[r["group"]][r["provider"]] = r
    return by_group


def best_sdpa(providers: dict[str, dict]) -> dict | None:
    """The fastest ``sdpa_*`` row of a group (eager time), or None."""
    found = [r for name, r in providers.items() if name.startswith("sdpa")]
    return min(found, key=lambda r: r["ms"]) if found else None


def table(all_rows: list[dict]) -> str:
    peak_tflops, peak_gbps, named = ceilings(gpu_of(all_rows))
    lines = [
        f"GPU: {named}",
        "",
        f"| op / shape | provider | ms | graph ms | TFLOP/s | % of {peak_tflops:.0f} | GB/s | % of "
        f"{peak_gbps / 1e3:.1f} TB/s | x reference | x best sdpa | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, providers in _groups(all_rows).items():
        ref, sdpa = providers.get("reference"), best_sdpa(providers)
        for name, r in providers.items():
            vs_sdpa = f"{sdpa['ms'] / r['ms']:.2f} ({sdpa['provider']})" if sdpa else ""
            lines.append(
                f"| {group} | {name} | {r['ms']:.4f} | {_fmt(r['graph_ms'], '.4f')} | {_fmt(r['tflops'], '.1f')} | "
                f"{_fmt(r['tflops'] and 100 * r['tflops'] / peak_tflops, '.1f')} | {_fmt(r['gbps'], '.0f')} | "
                f"{_fmt(r['gbps'] and 100 * r['gbps'] / peak_gbps, '.1f')} | "
                f"{_fmt(ref and ref['ms'] / r['ms'], '.2f')} | {vs_sdpa} | {_fmt(r['peak_mib'], '.0f')} |"
            )
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def targets(all_rows: list[dict]) -> str:
    """One line per GPU target: the measured figure and PASS / MISS, or "not measured"."""
    by_group = _groups(all_rows)

    def find(*words: str) -> dict[str, dict] | None:
        return next((p for g, p in by_group.items() if all(w in g for w in words)), None)

    def speed(group, fast: str, base: str, goal: float, what: str) -> str:
        if not group or base not in group or fast not in group:
            return f"- {what}: not measured"
        ratio = group[base]["ms"] / group[fast]["ms"]
        return f"- {what}: {ratio:.2f}x ({_verdict(ratio >= goal)}, target >= {goal:g}x)"

    def near_sdpa(group, fast: str, goal: float, what: str) -> str:
        sdpa = best_sdpa(group) if group else None
        if not group or fast not in group or sdpa is None:
            return f"- {what}: not measured"
        ratio = group[fast]["ms"] / sdpa["ms"]
        return (f"- {what}: {ratio:.2f}x the time of {sdpa['provider']} ({group[fast]['ms']:.4f} vs "
                f"{sdpa['ms']:.4f} ms; {_verdict(ratio <= goal)}, target <= {goal:g}x)")

    def memory(group, what: str) -> str:
        if not group or any(group.get(p, {}).get("peak_mib") is None for p in ("reference", "auto")):
            return f"- {what}: not measured"
        ratio = group["auto"]["peak_mib"] / group["reference"]["peak_mib"]
        return f"- {what}: {ratio:.2f} of the reference ({_verdict(ratio <= 1 / 3)}, target <= 0.33)"

    def select(group, what: str) -> str:
        row = (group or {}).get("triton")
        if row is None:
            return f"- {what}: not measured"
        eager = f"eager {row['ms'] * 1e3:.1f} us"
        if row["graph_ms"] is None:
            return f"- {what}: no GPU time ({row['graph_error'] or 'no graph replay recorded'}); {eager}"
        us = row["graph_ms"] * 1e3
        return f"- {what}: {us:.1f} us GPU time ({_verdict(us < SELECT_TARGET_US)}, target < 20 us); {eager}"

    policy = find("policy attention fwd+bwd", "paper", "bf16")
    gpu = gpu_of(all_rows)
    where = "" if gpu and "H200" in gpu else f" (set for an H200; measured on {gpu or 'a GPU not recorded'})"
    lines = [f"GPU targets{where} (triton / auto = stpcore's kernels):"]
    for group, providers in by_group.items():
        ran = (providers.get("auto") or {}).get("backends")
        if ran is not None and not any("triton" in names for names in ran.values()):
            lines.append(f"- WARNING: {group}: auto ran no Triton kernel (backends {ran}), so its figures and the "
                         "verdicts that use them measure PyTorch code, not stpcore's kernels")
    lines += [
        speed(policy, "triton", "reference", 10.0, "policy attention fwd+bwd B32-H6-N392-D64 bf16 vs reference"),
        near_sdpa(policy, "triton", 1.3, "policy attention fwd+bwd B32-H6-N392-D64 bf16 vs the fastest SDPA"),
    ]
    for keep in ("keep272", "keep192", "keep128"):
        lines.append(near_sdpa(find("varlen attention fwd+bwd", f"{keep} "), "triton", 1.2,
                               f"varlen attention fwd+bwd {keep} (equal lengths) vs the fastest SDPA"))
    for stage in ("stage1", "stage2", "stage3"):
        lines.append(select(find("select+topk+gather", stage), f"selection + top-k + gather {stage}"))
    phase2 = find("phase-2 step", "B=32")
    inference = find("inference")
    lines += [
        speed(phase2, "auto", "reference", 3.0, "phase-2 step B=32 throughput vs reference"),
        memory(phase2, "phase-2 step B=32 peak memory"),
        speed(inference, "auto", "reference", 3.0, "inference vs reference (both gather the kept tokens)"),
        speed(inference, "auto", "masked", 3.0, "inference vs masked (every token computed)"),
    ]
    for group, providers in by_group.items():  # reported, no target
        lines += [f"- {group} {name}: {r['frames_per_s']} frames/s (no target)"
                  for name, r in providers.items() if r.get("frames_per_s") is not None]
    return "\n".join(lines)


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
