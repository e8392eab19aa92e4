"""Two gloo processes must take the same branch: a NaN, a signal or a short shard on one rank used to leave
the other waiting in a collective forever (the run hung until killed). And they must train one model: after the
run both hold the same parameters, moved from the initial ones, although each rank saw different clips."""

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
    # Each rank's stdout and stderr go to their own files (--redirects): on a failure the message shows what the
    # ranks printed (a C++ abort says why only there), which torchrun's own error summary would push out of view.
    logs = out / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", str(WORKER), scenario, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: the two ranks hung\n{_rank_logs(logs)}")
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{_rank_logs(logs)}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _rank_logs(logs: Path) -> str:
    """The end of every non-empty stdout / stderr file the ranks wrote (attempt_0/<rank>/std*.log)."""
    return "\n".join(f"--- {path.relative_to(logs)}:\n{path.read_text(errors='replace')[-4000:]}"
                     for path in sorted(logs.rglob("*.log")) if path.stat().st_size)


def _parameters(out: Path) -> list[dict[str, dict[str, torch.Tensor]]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_nan_on_one_rank_stops_both_with_a_checkpoint(tmp_path):
    results = _run("nan_on_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["diverged", "diverged"]
    assert "another rank" in results[0]["message"] and "NaN" in results[1]["message"]
    assert list((tmp_path / "run").glob("diverged-step*.pt"))


def test_an_inf_clip_in_the_lstsq_fit_on_one_rank_stops_both(tmp_path):
    """The fit's pass raised on the rank that read it, and the other waited in the fit's sums forever."""
    results = _run("lstsq_inf_on_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["error", "error"]
    assert "another rank read a clip with NaN or Inf" in results[0]["message"]
    assert "video contains NaN or Inf values" in results[1]["message"]


def test_a_signal_during_the_lstsq_fit_on_one_rank_stops_both(tmp_path):
    results = _run("lstsq_signal_on_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["interrupted", "interrupted"]
    assert "signal on another rank during the lstsq decoder fit" in results[0]["message"]
    assert "signal 15 during the lstsq decoder fit" in results[1]["message"]
    assert results[0]["steps"] == results[1]["steps"] == 3  # phase 1 only: no phase-2 step ran
    # The fit's pass ended on both ranks at once (they agree before each batch): each read 2 of its 3 batches there
    # after phase 1's 3 (rank 0 read its whole shard, 3, before it heard of the signal at the pass's end).
    assert [len(r["clip_sums"]) for r in results] == [5, 5]


@pytest.mark.parametrize("scenario, file, steps", [("disk_full_on_rank0", "last.pt", 3),
                                                   ("log_fails_on_rank0", "metrics.jsonl", 3)])
def test_a_file_rank0_cannot_write_stops_both(tmp_path, scenario, file, steps):
    """Rank 0 alone writes the run's files: its disk-full error ended rank 0 and left rank 1 in a collective, to be
    ended by the transport (gloo: "Connection closed by peer") or, with NCCL, by its timeout or torchrun."""
    results = _run(scenario, tmp_path)
    assert [r["outcome"] for r in results] == ["file error", "file error"]
    for r in results:
        assert "rank 0 could not write" in r["message"] and file in r["message"], r["message"]
        assert "No space left on device" in r["message"] and "--resume" in r["message"], r["message"]
    # Checkpoint: phase 1's 3 steps, nothing after; log: the step whose line failed (the epoch's last: log_every is
    # 10), stopped at its end, on both.
    assert results[0]["steps"] == results[1]["steps"] == steps


def test_the_lstsq_fit_reads_every_rank_s_whole_shard_when_the_shards_differ(tmp_path):
    """The fit's pass agrees before each batch: a rank whose shard ended first keeps agreeing until the other's has."""
    results = _run("lstsq_short_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["finished", "finished"]
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (fit,) = [e for e in events if e.get("event") == "decoder fitted (lstsq)"]
    assert fit["clips"] == 3 * 2 + 2 * 2  # rank 0: 3 batches of 2 clips; rank 1: 2


def test_a_shorter_shard_ends_the_epoch_for_both(tmp_path):
    results = _run("short_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["finished", "finished"]
    assert results[0]["steps"] == results[1]["steps"] == 4  # 2 agreed steps per epoch, 2 epochs
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    noise = state["noise_rng_per_rank"]
    assert len(noise) == 2 and not torch.equal(noise[0], noise[1])  # each rank's own Gumbel stream is kept

    # Gradients are averaged over the ranks, so after the 4 steps (phase 1: STPrivacy; phase 2: all three models)
    # both hold the same parameters, bit for bit, and every parameter has moved from the common initialisation.
    assert results[0]["clip_sums"][:2] != results[1]["clip_sums"][:2]  # each rank trained on its own clips
    rank0, rank1 = _parameters(tmp_path)
    assert rank0["initial"].keys() == rank0["final"].keys() == rank1["final"].keys()
    for name, value in rank0["initial"].items():
        assert torch.equal(value, rank1["initial"][name]), f"{name}: the ranks started apart"
    differ = [name for name, value in rank0["final"].items() if not torch.equal(value, rank1["final"][name])]
    assert differ == [], f"parameters differ between the ranks after training: {differ}"
    for model in ("anonymizer", "action", "privacy"):
        assert any(n.startswith(f"{model}.") for n in rank0["final"]), model
    unchanged = [name for name, value in rank0["final"].items() if torch.equal(value, rank0["initial"][name])]
    assert unchanged == [], f"parameters training did not change: {unchanged}"


def test_without_gradient_averaging_the_ranks_drift_apart(tmp_path):
    """The control for the test above: the same run with the bare models (no DDP) ends with different
    parameters on the two ranks, so equal parameters there are the work of the gradient all-reduce."""
    results = _run("unsynced", tmp_path)
    assert [r["outcome"] for r in results] == ["finished", "finished"]
    rank0, rank1 = _parameters(tmp_path)
    assert all(torch.equal(value, rank1["initial"][name]) for name, value in rank0["initial"].items())
    same = [name for name, value in rank0["final"].items() if torch.equal(value, rank1["final"][name])]
    assert same == [], f"equal on both ranks without gradient averaging: {same}"


def test_a_signal_on_one_rank_stops_both(tmp_path):
    results = _run("signal_on_rank1", tmp_path)
    assert [r["outcome"] for r in results] == ["interrupted", "interrupted"]
    assert results[0]["steps"] == results[1]["steps"] == 3  # the step during which rank 1 saw it, on both
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    # Each rank's loader had read its own way into its shard (Batch.order_end): a resume restarts each there.
    assert state["position"]["videos_in_epoch_per_rank"] == [6, 106]


def test_the_phase2_privacy_options_train_one_model_on_both_ranks(tmp_path):
    """Issue 16's options under DDP: both ranks finish, and every model, the extra adversaries included, holds the
    same parameters on both, moved from the initial ones."""
    results = _run("adversaries", tmp_path)
    assert [r["outcome"] for r in results] == ["finished", "finished"], results
    ranks = _parameters(tmp_path)
    names = ranks[0]["final"].keys()
    assert any(n.startswith("privacy_1.") for n in names) and any(n.startswith("stats.") for n in names)
    for name in names:
        torch.testing.assert_close(ranks[0]["final"][name], ranks[1]["final"][name], msg=name)
    for model in ("privacy_1", "stats"):
        assert any(not torch.equal(ranks[0]["initial"][n], ranks[0]["final"][n]) for n in names
                   if n.startswith(f"{model}.")), model
    # Each rank replays its own past batches, and a resume gives each its own buffer back (every rank got rank 0's,
    # so a resumed run drifted from the uninterrupted one).
    assert results[0]["replay_sum"] != results[1]["replay_sum"]
    assert [r["replay_restored"] for r in results] == [True, True]


def test_the_nullspace_projection_is_one_fit_over_both_ranks(tmp_path):
    """privacy_nullspace under DDP: the probes' sums run over both ranks' shards, so both ranks end with the same
    reconstruction head, and the fit equals one process's over all the rows."""
    results = _run("nullspace", tmp_path)
    assert [r["outcome"] for r in results] == ["finished", "finished"], results
    assert [r["nullspace_matches_single"] for r in results] == [True, True]
    ranks = _parameters(tmp_path)
    torch.testing.assert_close(ranks[0]["final"]["anonymizer.head_recon.weight"],
                               ranks[1]["final"]["anonymizer.head_recon.weight"], rtol=0, atol=0)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e.get("event") == "privacy nullspace projected"]
    assert event["clips"] == 2 * 2 * 6  # two passes over both ranks' 6 clips


def test_the_data_report_sums_both_ranks_shards(tmp_path):
    """Each rank reads its own shard, so the logged data report is the sum of both ranks' (an unreadable video in
    rank 1's shard was missing from it: rank 0's loader's alone), and what both count at construction (split
    entries without a file) is taken once; the checkpoint keeps the sum, which a resume continues."""
    results = _run("report", tmp_path)
    assert [r["outcome"] for r in results] == ["finished", "finished"], results
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    missing = "missing file (split entry)"
    assert [(e["phase"], e["data_report"], e["data_report_total"]) for e in events if "data_report" in e] == [
        ("phase1", {missing: 1, "unreadable": 1}, {missing: 1, "unreadable": 1}),
        ("phase2", {"unreadable": 1}, {missing: 1, "unreadable": 2})]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["data_counts"] == {missing: 1, "unreadable": 2}
