"""Full-frame anonymization throughput (``stpcore anonymize --view full``): frames per second.

    .venv/bin/python -m pytest benchmarks/bench_fullframe.py --benchmark-only

Two sources, 320x240 and 1280x720, each brought to the training scale (short side 8/7 of the model's image
size) and covered by model windows: 171x128 in 2x2 windows and 228x128 in 2x3 for vit_small (112 px);
49x37 in 2x2 and 66x37 in 2x3 for the demo's tiny preset (32 px). The model is a ClipAnonymizer at
``precision="auto"`` (what ``stpcore anonymize`` runs) with random weights: top-k keeps a fixed count, so the
speed does not depend on training.

- ``test_fullframe_frames``: one chunk of frames already in memory (uint8, the decoder's output) -> resize,
  windows (all of the chunk's in one forward), model, stitch, uint8 frames at the working scale: everything
  but decoding and encoding. Runs on CUDA where present (the GPU harvest), else CPU.
- ``test_fullframe_file`` (CPU, needs PyAV): ``anonymize_file`` on an H.264 file of 32 frames, decoding and
  encoding included; windows of several chunks run in batches of 8.

extra_info: frames_per_s (source frames per second, from the median), windows (per clip), description.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from stpcore.anonymize import WindowAnonymizer, anonymize_file, plan_windows
from stpcore.data.preprocess import to_working_scale, working_short_side
from stpcore.data.sampling import resized_size
from stpcore.inference import ClipAnonymizer
from stpcore.models import STPrivacy, STPrivacyConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {"320x240": (240, 320), "1280x720": (720, 1280)}
PRESETS = ["vit_small"] if DEVICE == "cuda" else ["tiny", "vit_small"]
BATCH = 8  # windows per forward (stpcore anonymize's default)


@functools.cache
def _anonymizer(preset: str) -> ClipAnonymizer:
    torch.manual_seed(0)
    return ClipAnonymizer(STPrivacy(STPrivacyConfig.from_name(preset)).eval(), device=DEVICE, precision="auto")


def _frames(size: str, count: int) -> np.ndarray:
    """A moving colour pattern with noise, uint8 (count, H, W, 3) (cheap to make: the GPU step has 10 s)."""
    h, w = SIZES[size]
    t = np.arange(count)[:, None, None]
    x, y = np.arange(w)[None, None, :], np.arange(h)[None, :, None]
    frames = np.empty((count, h, w, 3), dtype=np.uint8)
    frames[..., 0] = 100 + 80 * np.sin((x + 7 * t) / 37)
    frames[..., 1] = 100 + 80 * np.cos((y - 5 * t) / 29)
    frames[..., 2] = (x + y + 3 * t) % 200
    return frames + np.random.default_rng(0).integers(0, 40, frames.shape, dtype=np.uint8)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("preset", PRESETS)
def test_fullframe_frames(benchmark, preset, size, request):
    anon = _anonymizer(preset)
    cfg = anon.cfg
    frames = _frames(size, cfg.num_frames)
    side = working_short_side(cfg.image_size)
    grid = plan_windows(*resized_size(*SIZES[size], side), cfg.image_size)
    runner = WindowAnonymizer(anon, grid, batch_size=BATCH)
    benchmark.group = f"full-frame anonymization, frames in memory ({DEVICE})"

    def step():
        out = runner.run([to_working_scale(frames, side)])
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    step()  # warm-up
    benchmark.pedantic(step, rounds=3 if DEVICE == "cuda" or preset == "tiny" else 2, iterations=1)
    benchmark.extra_info.update(windows=len(grid), description=anon.description)
    if not request.config.getoption("benchmark_disable"):
        benchmark.extra_info["frames_per_s"] = round(cfg.num_frames / benchmark.stats.stats.median, 1)


@pytest.mark.skipif(DEVICE != "cpu", reason="the file path runs where PyAV is (the CPU machines)")
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("preset", PRESETS)
def test_fullframe_file(benchmark, preset, size, tmp_path, request):
    pytest.importorskip("av")
    from stpcore import media

    anon = _anonymizer(preset)
    src = media.write_video(tmp_path / f"{size}.mp4", _frames(size, 32), fps=25)
    benchmark.group = "full-frame anonymization, file to file (cpu)"

    def step():
        return anonymize_file(src, tmp_path / "out", anon, batch_size=BATCH)

    step()  # warm-up
    benchmark.pedantic(step, rounds=2, iterations=1)
    side = working_short_side(anon.cfg.image_size)
    windows = len(plan_windows(*resized_size(*SIZES[size], side), anon.cfg.image_size))
    benchmark.extra_info.update(windows=windows, description=anon.description)
    if not request.config.getoption("benchmark_disable"):
        benchmark.extra_info["frames_per_s"] = round(32 / benchmark.stats.stats.median, 1)
