"""Two gloo processes must take the same branch: a NaN, a signal or a short shard on one rank used to leave
the other waiting in a collective forever (the run hung until killed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(scenario: str, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           scenario, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: the two ranks hung")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_nan_on_one_rank_stops_both_with_a_checkpoint(tmp_path):
    results = _run("nan_on_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["diverged", "diverged"]
    assert "another rank" in results[0]["message"] and "NaN" in results[1]["message"]
    assert list((tmp_path / "run").glob("diverged-step*.pt"))


def test_a_shorter_shard_ends_the_epoch_for_both(tmp_path):
    results = _run("short_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["finished", "finished"]
    assert results[0]["steps"] == results[1]["steps"] == 4  # 2 agreed steps per epoch, 2 epochs
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    noise = state["noise_rng_per_rank"]
    assert len(noise) == 2 and not torch.equal(noise[0], noise[1])  # each rank's own Gumbel stream is kept


def test_a_signal_on_one_rank_stops_both(tmp_path):
    results = _run("signal_on_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["interrupted", "interrupted"]
    assert results[0]["steps"] == results[1]["steps"] == 3  # the step during which rank 1 saw it, on both
    assert (tmp_path / "run" / "last.pt").is_file()
