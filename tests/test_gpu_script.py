"""benchmarks/gpu/run.sh runs once, unattended, on a lent GPU: its plumbing is checked here on CPU (DRY_RUN
collects every step without running it), and benchmarks/gpu/table.py's target checks on made-up results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import table  # noqa: E402


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_run_sh_collects_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not the calling session's
    env.update(DRY_RUN="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    model = (tmp_path / "gpu_model.txt").read_text()
    for name in ("test_inference_vit_small_b8[masked]", "test_inference_vit_small_b8[auto]",
                 "test_phase2_step_vit_small[reference]", "test_phase2_step_vit_small[auto]"):
        assert name in model, proc.stdout[-3000:]
    kernels = (tmp_path / "gpu_kernels.txt").read_text()
    assert "bench_attention.py::" in kernels and "bench_select.py::" in kernels
    assert " collected" in (tmp_path / "gpu_tests.txt").read_text()
    assert "error" not in (model + kernels).lower()


def _bench(group, provider, median_s, **extra):
    return {"group": group, "name": f"test[{provider}]", "params": {"provider": provider},
            "stats": {"median": median_s, "mean": median_s}, "extra_info": extra}


def test_table_checks_the_targets(tmp_path):
    data = {"benchmarks": [
        _bench("stprivacy phase-2 step (STPrivacy + both recognizers) vit_small B=32", "reference", 0.9, peak_mib=900),
        _bench("stprivacy phase-2 step (STPrivacy + both recognizers) vit_small B=32", "auto", 0.25, peak_mib=400),
        _bench("stprivacy inference vit_small B=8 16x112x112", "masked", 0.040),
        _bench("stprivacy inference vit_small B=8 16x112x112", "reference", 0.012),
        _bench("stprivacy inference vit_small B=8 16x112x112", "auto", 0.010),
        _bench("slot_topk_gather stage1", "triton", 0.001, do_bench_median_us=12.0),
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    rows = table.rows(data)
    assert rows[-1]["ms"] == pytest.approx(0.012)  # do_bench's microseconds, not the synced pytest time
    lines = table.targets(rows).splitlines()
    assert "3.60x (PASS" in lines[1] and "0.44 of the reference (MISS" in lines[2]
    assert "1.20x (MISS" in lines[3] and "4.00x (PASS" in lines[4]
    assert table.main([str(path), str(tmp_path / "missing.json")]) == 0
    assert table.main([str(tmp_path / "missing.json")]) == 1
    assert "not measured" in table.targets([])
