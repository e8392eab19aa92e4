"""Whole-model throughput: STPrivacy inference and a training step, per backend.

    .venv/bin/python -m pytest benchmarks/bench_model.py --benchmark-only

Providers: ``reference`` forces every op to its direct PyTorch reference (STPCORE_BACKEND=reference);
``auto`` lets dispatch choose (the chunked policy attention on CPU, the Triton kernels on a GPU).
Inference adds ``masked``: the reference backend computing every one of the 392 tokens through all blocks,
the dropped ones masked out of attention by the policy (the training-mode computation: what inference costs
without dropping tokens). In eval mode ``reference`` and ``auto`` both gather the kept tokens and run SDPA
on them, so only the selection ops differ between them; the cut in work comes from the gather, measured
against ``masked``.
extra_info: clips/s from the median time, and the peak memory of one call after a warm-up call (``peak_mib``;
on CPU with glibc tuned so RSS follows the live tensors, plus ``peak_mib_default_first`` / ``_later``: a
default process's first call and largest later call; see benchmarks/memory.py); ``backends``: the backend
dispatch picked per op while the benchmark ran (``stpcore.ops.dispatch.chosen``). On CUDA every timed call
ends with torch.cuda.synchronize().
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks.memory import cpu_peak_default_mib, cpu_peak_mib, cuda_peak_mib
from stpcore.models import STPrivacy, STPrivacyConfig
from stpcore.ops import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ["reference", "auto"]
INFERENCE_PROVIDERS = ["masked", "reference", "auto"]
TRAIN_BATCH = 32 if DEVICE == "cuda" else 4  # the GPU targets are at B=32; B=4 keeps the CPU run short


def _set_backend(provider: str) -> None:
    if provider in ("reference", "masked"):
        os.environ["STPCORE_BACKEND"] = "reference"
    else:
        os.environ.pop("STPCORE_BACKEND", None)


def _amp(device: str):
    """bf16 autocast on CUDA (the GPU targets are bf16); fp32 on CPU (what a camera box runs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _synced(step, device: str):
    """``step`` that waits for the GPU, so a timing covers the work and not only its launch."""
    if device != "cuda":
        return step

    def run():
        out = step()
        torch.cuda.synchronize()
        return out

    return run


def build_inference(preset: str = "vit_small", batch: int = 8, provider: str = "auto", device: str = DEVICE):
    """A callable running one no-grad eval forward (the paper's keep ratio) on a random clip batch; with
    provider "masked", the same model's train-mode computation (all tokens, dropped ones masked; the
    decisions are the predictors' argmax, Gumbel noise 0)."""
    _set_backend(provider)
    torch.manual_seed(0)
    cfg = STPrivacyConfig.from_name(preset)
    model = STPrivacy(cfg).to(device)
    model.train(provider == "masked")
    video = torch.randn(batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size, device=device)
    zero_noise = [torch.zeros(batch, cfg.num_tokens, 2, device=device) for _ in range(cfg.num_stages)] \
        if provider == "masked" else None

    def step():
        with torch.no_grad(), _amp(device):
            return (model(video, zero_noise) if provider == "masked" else model(video)).video

    return _synced(step, device)


def build_train_step(preset: str = "vit_small", batch: int = 4, provider: str = "auto", device: str = DEVICE):
    """A callable running one phase-1 style training step: forward (Gumbel path), loss, backward, AdamW
    (bf16 autocast on CUDA, fp32 on CPU)."""
    _set_backend(provider)
    torch.manual_seed(0)
    cfg = STPrivacyConfig.from_name(preset)
    model = STPrivacy(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    video = torch.randn(batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    targets = torch.tensor([cfg.keep_ratio ** (s + 1) for s in range(cfg.num_stages)], device=device)

    def step():
        with _amp(device):
            out = model(video)
            kept = torch.stack([d.mean(dim=1) for d in out.decisions], dim=1)  # (B, stages)
            loss = F.cross_entropy(out.action_logits, labels) + (kept - targets).pow(2).mean() + out.video.mean() * 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return _synced(step, device)


def build_phase2_step(preset: str = "vit_small", batch: int = 4, provider: str = "auto", device: str = DEVICE,
                      compile: bool = False):
    """A callable running one phase-2 step: STPrivacy (adversarial loss through both frozen recognizers),
    then the action and privacy recognizers on the detached transformed video (three optimizer steps);
    ``compile``: the trainer's models through torch.compile (TrainConfig.compile)."""
    from stpcore.testing import RandomClipLoader
    from stpcore.training import TrainConfig, Trainer

    _set_backend(provider)
    cfg_model = STPrivacyConfig.from_name(preset)
    loader = RandomClipLoader(1, batch, cfg_model.num_frames, cfg_model.image_size, num_classes=51)
    cfg = TrainConfig(data_root="unused", out_dir="/tmp/stpcore-bench", preset=preset, batch_size=batch,
                      progress=False, compile=compile)
    trainer = Trainer(cfg, loader, device=device)
    for m in trainer.models.values():
        m.train()
    batch_data = next(iter(loader))

    def step():
        return trainer.phase2_step(batch_data)

    return _synced(step, device)


def _record(benchmark, batch: int, peak_mib: float | None) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median:
        benchmark.extra_info["clips_per_s"] = round(batch / stats.stats.median, 2)
    if peak_mib is not None:
        benchmark.extra_info["peak_mib"] = round(peak_mib, 1)
    benchmark.extra_info["device"] = DEVICE
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["backends"] = dispatch.chosen()  # what ran (each test starts with forget_choices)


def _peak(benchmark, builder: str, **kwargs) -> float:
    """The peak MiB of one call (benchmarks/memory.py); on CPU also both figures of a default process."""
    if DEVICE == "cuda":
        return cuda_peak_mib(globals()[builder](**kwargs))
    first, later = cpu_peak_default_mib("benchmarks.bench_model", builder, **kwargs)
    benchmark.extra_info.update(peak_mib_default_first=round(first, 1), peak_mib_default_later=round(later, 1))
    return cpu_peak_mib("benchmarks.bench_model", builder, **kwargs)


@pytest.mark.parametrize("provider", INFERENCE_PROVIDERS)
def test_inference_vit_small_b8(benchmark, provider, request):
    dispatch.forget_choices()
    benchmark.group = "stprivacy inference vit_small B=8 16x112x112"
    step = build_inference(batch=8, provider=provider)
    step()  # warm-up
    benchmark.pedantic(step, rounds=5, iterations=1)
    disabled = request.config.getoption("benchmark_disable")
    _record(benchmark, 8, None if disabled else _peak(benchmark, "build_inference", batch=8, provider=provider))
    _set_backend("auto")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_phase2_step_vit_small(benchmark, provider, request):
    dispatch.forget_choices()
    batch = TRAIN_BATCH
    benchmark.group = f"stprivacy phase-2 step (STPrivacy + both recognizers) vit_small B={batch}"
    step = build_phase2_step(batch=batch, provider=provider)
    step()  # warm-up
    benchmark.pedantic(step, rounds=3, iterations=1)
    disabled = request.config.getoption("benchmark_disable")
    peak = None if disabled else _peak(benchmark, "build_phase2_step", batch=batch, provider=provider)
    _record(benchmark, batch, peak)
    _set_backend("auto")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step_vit_small(benchmark, provider, request):
    dispatch.forget_choices()
    batch = TRAIN_BATCH
    benchmark.group = f"stprivacy phase-1 training step vit_small B={batch} 16x112x112"
    step = build_train_step(batch=batch, provider=provider)
    step()  # warm-up (optimizer state allocated)
    benchmark.pedantic(step, rounds=3, iterations=1)
    disabled = request.config.getoption("benchmark_disable")
    peak = None if disabled else _peak(benchmark, "build_train_step", batch=batch, provider=provider)
    _record(benchmark, batch, peak)
    _set_backend("auto")


# -- torch.compile on the GPU (the harvest's compile steps) ----------------------------------------------


def _first_call_s(step) -> float:
    """Seconds of ``step``'s first call (for a compiled step: the compile), synchronised."""
    import time

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return round(time.perf_counter() - start, 1)


def _compiled_vs_eager(benchmark, eager, compiled, batch: int, rounds: int = 5) -> None:
    """The compiled step timed (after its first, compiling call), then eager and compiled back to back."""
    import statistics
    import time

    if "compile_s" not in benchmark.extra_info:
        benchmark.extra_info["compile_s"] = _first_call_s(compiled)
    eager()
    benchmark.pedantic(compiled, rounds=rounds, iterations=1, warmup_rounds=1)
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        eager()
        t1 = time.perf_counter()
        compiled()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    benchmark.extra_info["speedup_vs_eager"] = round(statistics.median(ratios), 3)
    _record(benchmark, batch, None)


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU compile target (compiled + CUDA graphs, bf16, B=32)")
def test_compiled_cudagraph_inference_vit_small_b32(benchmark):
    from stpcore.inference import ClipAnonymizer
    from stpcore.testing import separate_keep_scores

    batch = 32
    benchmark.group = f"stprivacy inference vit_small B={batch}, torch.compile + CUDA graphs vs eager auto"
    _set_backend("auto")
    torch.manual_seed(0)
    cfg = STPrivacyConfig.from_name("vit_small")
    model = separate_keep_scores(STPrivacy(cfg), scale=10.0).eval()
    clips = torch.randn(batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size, device=DEVICE)
    eager = ClipAnonymizer(model, device=DEVICE)
    compiled = ClipAnonymizer(model, device=DEVICE, compile="reduce-overhead")
    benchmark.extra_info["compile_s"] = _first_call_s(lambda: compiled(clips))
    benchmark.extra_info["keep_agreement"] = round((eager(clips).keep == compiled(clips).keep).float().mean().item(), 4)
    benchmark.extra_info["description"] = compiled.description
    _compiled_vs_eager(benchmark, _synced(lambda: eager(clips), DEVICE), _synced(lambda: compiled(clips), DEVICE),
                       batch)


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU compile target (compiled phase-2 step, bf16, B=32)")
def test_compiled_phase2_step_vit_small(benchmark):
    batch = TRAIN_BATCH
    benchmark.group = f"stprivacy phase-2 step vit_small B={batch}, torch.compile vs eager auto"
    eager = build_phase2_step(batch=batch, provider="auto")
    compiled = build_phase2_step(batch=batch, provider="auto", compile=True)
    _compiled_vs_eager(benchmark, eager, compiled, batch, rounds=3)

