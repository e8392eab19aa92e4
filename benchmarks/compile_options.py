"""Which Inductor settings pay for CPU inference? ``ClipAnonymizer`` (vit_small, B=8, fp32) compiled with each
setting, timed alternately with the eager anonymizer in one process (the median of eager / compiled per
round), and the keep masks compared with eager's; and the eager forward's profile (the share of its CPU time
per aten op), which bounds what any compiler can fuse.

    .venv/bin/python benchmarks/compile_options.py [--rounds 9] [--json OUT.json]

Settings: ``default`` (``torch.compile`` as ``ClipAnonymizer(compile=True)`` runs it) and ``freezing+autotune``
(weights frozen into the graph and oneDNN-packed, ``max_autotune`` GEMM templates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from stpcore.inference import ClipAnonymizer
from stpcore.models import STPrivacy, STPrivacyConfig
from stpcore.testing import separate_keep_scores

SETTINGS = {"default": {}, "freezing+autotune": {"freezing": True, "max_autotune": True}}


def eager_profile(eager: ClipAnonymizer, clips: torch.Tensor, top: int = 8) -> dict[str, float]:
    """The share of the eager forward's CPU self time per aten op (torch.profiler), the ``top`` largest."""
    eager(clips)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eager(clips)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = sorted(((e.key, e.self_cpu_time_total / total) for e in events), key=lambda kv: -kv[1])
    return {k: round(v, 4) for k, v in shares[:top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = STPrivacyConfig.from_name("vit_small")
    model = separate_keep_scores(STPrivacy(cfg), scale=10.0).eval()
    clips = torch.randn(8, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    eager = ClipAnonymizer(model, precision="fp32")
    reference = eager(clips).keep
    report = {"threads": torch.get_num_threads(), "settings": {}, "eager_profile": eager_profile(eager, clips)}
    compiled = {}
    for name, options in SETTINGS.items():
        anon = ClipAnonymizer(model, precision="fp32")
        anon._forward = torch.compile(anon.model, options=options)  # the compile=True path with other options
        start = time.perf_counter()
        keep = anon(clips).keep
        report["settings"][name] = {"compile_s": round(time.perf_counter() - start, 1),
                                    "keep_agreement": round((keep == reference).float().mean().item(), 4)}
        anon(clips)
        compiled[name] = anon

    def timed(fn) -> float:
        start = time.perf_counter()
        fn(clips)
        return time.perf_counter() - start

    ratios = {name: [] for name in compiled}
    for _ in range(args.rounds):
        for name, anon in compiled.items():
            ratios[name].append(timed(eager) / timed(anon))
    for name, r in ratios.items():
        report["settings"][name]["speedup_vs_eager"] = round(statistics.median(r), 3)
        report["settings"][name]["rounds"] = [round(v, 3) for v in r]
        print(name, report["settings"][name])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
