"""Which Inductor settings pay for CPU inference? ``ClipAnonymizer`` (vit_small, B=8, fp32) compiled with each
setting, timed alternately with the eager anonymizer in one process (the median of eager / compiled per
round), and the keep masks compared with eager's; and each forward's profile (the share of its CPU time per aten
op; the milliseconds in the library calls Inductor keeps and in the rest), which bounds what any compiler can fuse.

    .venv/bin/python benchmarks/compile_options.py [--rounds 9] [--settings NAME ...] [--json OUT.json]

Settings: ``default`` (``torch.compile`` as ``ClipAnonymizer(compile=True)`` runs it), ``freezing``
(the weights frozen into the graph as constants, so Inductor packs each Linear's weight for the CPU's GEMM
library: oneDNN with the bias and the GELU or residual add fused into it when the batch is dynamic, MKL when it
is static) and ``freezing+autotune`` (also ``max_autotune``: each GEMM timed against Inductor's C++ GEMM template;
minutes of compile on a 2-core machine, so only with ``--settings``).

Each setting applies its Inductor settings around every call, and has its own backend. Passing them as
``torch.compile(options=...)`` does not freeze: Dynamo reads ``freezing`` from the global config while it traces,
before the options apply, so the weights stay graph inputs and the compiled code still calls ``aten::addmm``
(as this script's runs before 2026-12-07 did). And a module compiled twice under one backend reuses the first
graph whatever the global settings.
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

SETTINGS = {"default": {}, "freezing": {"freezing": True},
            "freezing+autotune": {"freezing": True, "max_autotune": True}}
DEFAULT_SETTINGS = ("default", "freezing")

# Library calls Inductor keeps as they are on CPU (a compiler can only fuse what lies outside them): the GEMMs
# (eager's addmm; with frozen weights the packed oneDNN / MKL linears, which hold the fused epilogues) and SDPA.
LIBRARY_OPS = ("aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu", "mkldnn::_linear_pointwise",
               "mkldnn::_linear_pointwise.binary", "mkl::_mkl_linear")


def compiled_forward(model: torch.nn.Module, patches: dict):
    """``model`` compiled by Inductor with ``patches`` applied to its config around every call: Dynamo reads
    ``freezing`` while it traces (to keep the parameters as constants), Inductor while it compiles. Each call
    here makes its own backend, so two settings never share compiled graphs."""
    from torch._inductor import config
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, backend=backend)

    def forward(*args, **kwargs):
        with config.patch(patches):
            return compiled(*args, **kwargs)

    return forward


def forward_profile(forward, clips: torch.Tensor, top: int = 8, library_ops: tuple[str, ...] = LIBRARY_OPS) -> dict:
    """One warm call of ``forward`` (an anonymizer, or any callable on ``clips``) under torch.profiler: the share of
    CPU self time of the ``top`` largest entries (aten ops; a compiled graph's own generated code is its "Call
    CompiledFxGraph" entry, renamed "Inductor generated code"), and the milliseconds in the library calls
    (``library_ops``) and in everything else."""
    forward(clips)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward(clips)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)

    def name(key: str) -> str:
        return "Inductor generated code" if "CompiledFxGraph" in key else key

    shares = sorted(((name(e.key), e.self_cpu_time_total / total) for e in events), key=lambda kv: -kv[1])
    library = sum(e.self_cpu_time_total for e in events if e.key in library_ops)
    return {"shares": {k: round(v, 4) for k, v in shares[:top]},
            "library_ms": round(library / 1e3, 1), "rest_ms": round((total - library) / 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(DEFAULT_SETTINGS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = STPrivacyConfig.from_name("vit_small")
    model = separate_keep_scores(STPrivacy(cfg), scale=10.0).eval()
    clips = torch.randn(8, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    eager = ClipAnonymizer(model, precision="fp32")
    reference = eager(clips).keep
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "settings": {},
              "eager_profile": forward_profile(eager, clips)}
    compiled = {}
    for name in args.settings:
        anon = ClipAnonymizer(model, precision="fp32", compile=True)  # the batch dimension dynamic, as compile=True
        anon._forward = compiled_forward(anon.model, SETTINGS[name])
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
