"""Clip throughput of the data paths: PyAV (CPU), DALI-CPU, and DALI on the GPU (skipped without CUDA).

Clips are 16 x 112 x 112 cut from 320x240 VP9 sources (stride 2), train-mode sampling; `extra_info` carries
clips/s and the worker count. A smoke run: `pytest benchmarks/bench_data.py --benchmark-disable`.
The GPU function is called by benchmarks/gpu/run.sh; on the GPU the sources are H.264 (NVDEC).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from stpcore.data.decode_dali import dali_available
from stpcore.data.loader import DataConfig, get_loader
from stpcore.data.synth import make_synthetic_dataset

pytest.importorskip("av")

WORKERS = 2
BATCH = 8


@pytest.fixture(scope="module")
def vp9_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_vp9")
    make_synthetic_dataset(root, videos=16, seed=0, codec="vp9", width=320, height=240, frames=40)
    return root


def _epoch(cfg: DataConfig) -> int:
    loader = get_loader(cfg)
    clips = 0
    for batch in loader:
        clips += len(batch)
        if cfg.device == "cuda":
            torch.cuda.synchronize()
    return clips


def _bench(benchmark, cfg: DataConfig, provider: str) -> None:
    benchmark.group = "clips 16x112x112 from 320x240"
    t0 = time.perf_counter()
    clips = benchmark.pedantic(_epoch, args=(cfg,), rounds=1, iterations=1)
    seconds = time.perf_counter() - t0
    assert clips > 0
    benchmark.extra_info.update(
        provider=provider, workers=cfg.workers, batch=cfg.batch_size, clips=clips, clips_per_s=clips / seconds
    )


def test_pyav_cpu(benchmark, vp9_root):
    cfg = DataConfig(root=vp9_root, batch_size=BATCH, workers=WORKERS, decoder="pyav", device="cpu")
    _bench(benchmark, cfg, "pyav")


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_cpu(benchmark, vp9_root):
    cfg = DataConfig(root=vp9_root, batch_size=BATCH, workers=WORKERS, decoder="dali", device="cpu")
    _bench(benchmark, cfg, "dali-cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_gpu(benchmark, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_h264")
    make_synthetic_dataset(root, videos=64, seed=0, codec="h264", width=320, height=240, frames=40, workers=8)
    cfg = DataConfig(root=root, batch_size=32, workers=8, decoder="dali", device="cuda")
    _bench(benchmark, cfg, "dali-gpu")
