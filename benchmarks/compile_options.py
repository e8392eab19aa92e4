"""Which Inductor settings pay for CPU inference? ``ClipAnonymizer`` (vit_small, B=8, fp32) compiled with each
setting, timed alternately with the eager anonymizer in one process (the median of eager / compiled per
round), and the keep masks compared with eager's; and each forward's profile (the share of its CPU time per aten
op; the milliseconds in the library calls Inductor keeps and in the rest), which bounds what any compiler can fuse.

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


# Library calls Inductor keeps as they are on CPU (a compiler can only fuse what lies outside them).
LIBRARY_OPS = ("aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu")


def forward_profile(anon: ClipAnonymizer, clips: torch.Tensor, top: int = 8) -> dict:
    """One warm forward under torch.profiler: the share of CPU self time of the ``top`` largest entries (aten
    ops; a compiled graph's own generated code is its "Call CompiledFxGraph" entry, renamed "Inductor generated
    code"), and the milliseconds in the library calls (LIBRARY_OPS) and in everything else."""
    anon(clips)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        anon(clips)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)

    def name(key: str) -> str:
        return "Inductor generated code" if "CompiledFxGraph" in key else key

    shares = sorted(((name(e.key), e.self_cpu_time_total / total) for e in events), key=lambda kv: -kv[1])
    library = sum(e.self_cpu_time_total for e in events if e.key in LIBRARY_OPS)
    return {"shares": {k: round(v, 4) for k, v in shares[:top]},
            "library_ms": round(library / 1e3, 1), "rest_ms": round((total - library) / 1e3, 1)}


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
    report = {"threads": torch.get_num_threads(), "settings": {}, "eager_profile": forward_profile(eager, clips)}
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
        report["settings"][name]["profile"] = forward_profile(anon, clips)

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
