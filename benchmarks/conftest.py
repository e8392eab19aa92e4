"""Benchmark-session hooks: the GPU's name in every pytest-benchmark JSON (``machine_info["gpu"]``), so the GPU
table (benchmarks/gpu/table.py) judges each figure against that GPU's own ceilings."""

from __future__ import annotations

import pytest


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark's hook; absent without the plugin
def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
