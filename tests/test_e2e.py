"""End to end on a tiny synthetic dataset, through the command line: data -> train (1 and 2 processes) ->
resume -> eval -> anonymize -> demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")  # PyAV: CI installs it; a GPU machine without it skips these modules

from stpcore.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", str(out), "--videos", "28", "--seed", "0", "--width", "64", "--height", "48",
                 "--frames", "20"]) == 0
    return out


def _train_args(dataset, out, *extra):
    return ["train", "--data-root", str(dataset), "--labels", str(dataset / "vp_labels.csv"), "--out-dir", str(out),
            "--preset", "tiny", "--batch-size", "4", "--workers", "0", "--decoder", "pyav", "--stride", "2",
            "--no-progress", "--base-lr", "0.5", "--warmup-epochs", "0", "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert main(_train_args(dataset, out, "--phase1-epochs", "2", "--phase2-epochs", "2", "--deterministic")) == 0
    return out


def test_train_cli_runs_both_phases_and_exports(trained):
    lines = [r for r in _jsonl(trained / "metrics.jsonl") if "loss" in r]
    assert {r["phase"] for r in lines} == {"phase1", "phase2"}
    assert all(np.isfinite(r["loss"]) for r in lines)
    state = torch.load(trained / "last.pt", weights_only=True)
    assert state["position"]["phase"] == "done"
    assert (trained / "stprivacy.pt").is_file()


def test_resume_on_real_data_matches_uninterrupted(dataset, trained, tmp_path):
    """The same run as `trained`, interrupted mid-epoch in phase 1, then resumed: identical losses."""
    from stpcore.config import dataclass_from_args
    from stpcore.testing import StopAfter
    from stpcore.training import TrainConfig, Trainer, TrainingInterrupted

    args = _train_args(dataset, tmp_path / "run", "--phase1-epochs", "2", "--phase2-epochs", "2", "--deterministic")
    cfg = dataclass_from_args(TrainConfig, __import__("stpcore.cli").cli.build_parser().parse_args(args))
    first = Trainer(cfg)
    first.loader = StopAfter(first.loader, 5)
    first.loader.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    assert main([*args, "--resume", str(tmp_path / "run" / "last.pt")]) == 0
    full = [r["loss"] for r in _jsonl(trained / "metrics.jsonl") if "loss" in r]
    resumed = [r["loss"] for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert resumed == full and len(full) >= 4


@pytest.mark.filterwarnings("ignore::stpcore.data.DataWarning")
def test_resume_after_an_unreadable_video_matches_uninterrupted(dataset, tmp_path):
    """An unreadable video before the interruption: the resumed run starts the loader where the interrupted one had
    read to, not a whole number of batches in (with batch size 1 the skipped video takes no step, so counting
    steps would train on a video twice)."""
    import shutil

    from stpcore.config import dataclass_from_args
    from stpcore.testing import StopAfter
    from stpcore.training import TrainConfig, Trainer, TrainingInterrupted

    data = tmp_path / "data"
    shutil.copytree(dataset, data)

    def args(out):
        return [*_train_args(data, out, "--phase1-epochs", "1", "--phase2-epochs", "1", "--deterministic"),
                "--batch-size", "1"]

    def config(out):
        return dataclass_from_args(TrainConfig, __import__("stpcore.cli").cli.build_parser().parse_args(args(out)))

    Trainer(config(tmp_path / "probe")).loader.records[-1].path.unlink()  # a split entry without its file
    first = Trainer(config(tmp_path / "run"))
    order = first.loader.shard().tolist()
    first.loader.records[order[1]].path.write_bytes(b"not a video")  # the second video of phase 1's epoch
    first.loader = StopAfter(first.loader, 4)
    first.loader.trainer = first
    with pytest.raises(TrainingInterrupted):
        first.fit()
    assert main([*args(tmp_path / "run"), "--resume", str(tmp_path / "run" / "last.pt")]) == 0
    assert main(args(tmp_path / "full")) == 0
    full = [(r["step"], r["loss"]) for r in _jsonl(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    resumed = [(r["step"], r["loss"]) for r in _jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert resumed == full and len(full) == 2 * (len(order) - 1)
    # The data report continues the interrupted run's: the same lines (per epoch, and the totals) as without a stop.
    reports = {run: [(r["phase"], r["epoch"], r["data_report"], r["data_report_total"])
                     for r in _jsonl(tmp_path / run / "metrics.jsonl") if "data_report" in r]
               for run in ("run", "full")}
    assert reports["run"] == reports["full"] and len(reports["full"]) == 2
    assert reports["full"][0][2] == {"missing file (split entry)": 1, "unreadable": 1}


def test_two_process_gloo_run_shards_without_overlap(dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stpcore",
           *_train_args(dataset, out, "--phase1-epochs", "1", "--phase2-epochs", "1", "--batch-size", "7")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shards = [r for r in _jsonl(out / "metrics.jsonl") if "videos_per_rank" in r]
    assert [r["phase"] for r in shards] == ["phase1", "phase2"]
    from stpcore.data import DataConfig, get_loader

    train_videos = len(get_loader(DataConfig(root=dataset, num_frames=8, crop=32, decoder="pyav")).records)
    for r in shards:
        assert r["videos_in_two_ranks"] == 0 and r["videos_per_rank"][0] == r["videos_per_rank"][1]
        assert r["videos_total"] == train_videos  # 14 training videos = 2 ranks x 1 batch of 7
    assert (out / "stprivacy.pt").is_file()


def test_eval_cli_produces_all_metrics(dataset, trained, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(trained / "stprivacy.pt"), "--methods", "raw,stprivacy,blur_weak",
                 "--data-root", str(dataset), "--labels", str(dataset / "vp_labels.csv"), "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--decoder", "pyav", "--stride", "2", "--out-dir", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"method", "top1", "f1", "cmap"} <= set(header)
    ours = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    assert [r["method"] for r in ours][:3] == ["raw", "stprivacy@0.7", "blur_weak"]
    for r in ours[:3]:
        assert 0 <= float(r["top1"]) <= 100 and 0 <= float(r["cmap"]) <= 100 and 0 <= float(r["f1"]) <= 1


def test_eval_resume_reads_back_finished_methods_and_redoes_changed_ones(dataset, trained, tmp_path, monkeypatch):
    """An evaluation stopped after its first method goes on with --resume from the next one; a method saved with
    other settings or another checkpoint is trained again."""
    from stpcore.evaluation import protocol

    trained_methods = []
    real = protocol.evaluate_method
    monkeypatch.setattr(protocol, "evaluate_method",
                        lambda transform, *a, **k: trained_methods.append(transform.name.split("@")[0])
                        or real(transform, *a, **k))
    out = tmp_path / "eval"

    def run(*extra):
        trained_methods.clear()
        assert main(["eval", "--checkpoint", str(trained / "stprivacy.pt"), "--methods", "raw,stprivacy",
                     "--data-root", str(dataset), "--labels", str(dataset / "vp_labels.csv"), "--epochs", "1",
                     "--batch-size", "4", "--workers", "0", "--decoder", "pyav", "--stride", "2", "--out-dir",
                     str(out), "--no-progress", "--device", "cpu", *extra]) == 0
        rows = [r.split(",") for r in (out / "results.csv").read_text().splitlines()]
        seconds = rows[0].index("seconds")
        return list(trained_methods), [r[:seconds] + r[seconds + 1:] for r in rows]  # all but the timing

    done, table = run()
    assert done == ["raw", "stprivacy"]
    (out / "methods" / "stprivacy.json").unlink()  # as if stopped while stprivacy's recognizers trained
    assert run("--resume") == (["stprivacy"], table)  # raw read back; stprivacy trained again, the same
    assert run("--resume")[0] == []
    assert run("--resume", "--keep-ratio", "0.5")[0] == ["stprivacy"]  # another keep ratio: that method again
    assert run("--resume", "--seed", "1")[0] == ["raw", "stprivacy"]  # other settings: all again
    assert run()[0] == ["raw", "stprivacy"]  # without --resume nothing is read back


def test_anonymize_cli_writes_playable_video_with_black_dropped_tubelets(trained, tmp_path):
    from stpcore import media

    rng = np.random.default_rng(1)
    frames = (rng.random((20, 48, 64, 3)) * 200 + 40).astype(np.uint8)  # nothing black in the source
    src = media.write_video(tmp_path / "camera.mp4", frames, fps=10)
    out = tmp_path / "anon"
    assert main(["anonymize", str(src), "-o", str(out), "--checkpoint", str(trained / "stprivacy.pt"),
                 "--precision", "fp32"]) == 0
    with av.open(str(out / "camera.anonymized.mp4")) as c:
        video = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert video.shape == (20, 38, 50, 3)  # the whole 64x48 frame at the working scale, 49x37 (+1 px of padding)
    saved = np.load(out / "camera.keep.npz")
    assert saved["work_size"].tolist() == [37, 49] and saved["keep"].shape == (3, 4, 64)
    from stpcore.tubelets import keep_to_pixels

    first = video[:8].astype(float)  # the first clip: frames 0-7 (stride 1)
    for k, ((oy, ox), (y0, y1, x0, x1)) in enumerate(zip(saved["window"], saved["owned"], strict=True)):
        mask = keep_to_pixels(torch.from_numpy(saved["keep"][0, k]).float()[None], (4, 4, 4), (2, 8, 8))[0, 0]
        mask = mask.bool().numpy()[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        region = first[:, y0:y1, x0:x1]
        if (~mask).any():
            assert region[~mask].mean() < 12, k  # dropped: black (up to the codec)
        if mask.any():
            assert region[mask].mean() > 40, k


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--videos", "21", "--width", "64", "--height", "48", "--frames", "24",
                 "--phase1-epochs", "1", "--phase2-epochs", "1", "--eval-epochs", "1", "--batch-size", "4",
                 "--sweep"]) == 0
    printed = capsys.readouterr().out
    assert "paper: STPrivacy" in printed and str(out.resolve()) in printed
    assert "changes with the training seed and with the machine" in printed  # one run's verdict is no guarantee
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["results"]] == ["raw", "stprivacy@0.7", "blur_strong"]
    assert summary["sweep"][0]["setting"] == "keep_ratio" and (out / "eval" / "sweep.png").stat().st_size > 1000
    assert list((out / "anonymized").glob("*.side_by_side.mp4"))
    # The demo's phase 2 ends with the nullspace projection (8 rounds) on the decoded training videos.
    events = [e for e in _jsonl(out / "train" / "metrics.jsonl") if e.get("event") == "privacy nullspace projected"]
    assert [(e["rounds"], len(e["probe_accuracy"])) for e in events] == [(8, 8)] and events[0]["clips"] > 0
    # A second run reuses the dataset and the trained model.
    assert main(["demo", "--out", str(out), "--videos", "21", "--width", "64", "--height", "48", "--frames", "24",
                 "--phase1-epochs", "1", "--phase2-epochs", "1", "--eval-epochs", "1", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "reusing the trained STPrivacy" in printed and "sweep skipped" in printed  # no --sweep: none run
    # Other settings on the same folder: refused, not reported under settings the folder's model never had.
    small = ["demo", "--out", str(out), "--width", "64", "--height", "48", "--frames", "24", "--phase1-epochs", "1",
             "--phase2-epochs", "1", "--eval-epochs", "1", "--batch-size", "4"]
    summary_before = (out / "summary.json").read_bytes()
    assert main([*small, "--videos", "21", "--privacy-objective", "bce"]) == 2
    assert "trained with other settings {'privacy_objective': ('entropy', 'bce')}" in capsys.readouterr().err
    assert main([*small, "--videos", "28"]) == 2
    assert "made with other settings {'videos': (21, 28)}" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == summary_before


def test_sweep_cli_writes_csv_and_plot(dataset, trained, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--checkpoint", str(trained / "stprivacy.pt"), "--keep-ratios", "1.0,0.5",
                 "--thresholds", "0.5", "--with-raw", "--data-root", str(dataset), "--labels",
                 str(dataset / "vp_labels.csv"), "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--decoder", "pyav", "--stride", "2", "--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 3  # header, the raw reference, two keep ratios and one threshold
    assert (out / "sweep.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "α=0.5" in printed and "t=0.5" in printed


def test_demo_variants_script_scores_a_variant(tmp_path):
    import subprocess
    import sys

    demo = json.dumps({"videos": 14, "width": 64, "height": 48, "frames": 24, "phase1_epochs": 1, "phase2_epochs": 1,
                       "eval_epochs": 1, "batch_size": 4})
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_variants.py"
    subprocess.run([sys.executable, str(script), "v1", '{"privacy_weight": 2.0}', "--demo", demo, "--workdir",
                    str(tmp_path), "--keep-ratios", "1.0"], check=True, capture_output=True, timeout=600)
    (line,) = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert line["train_overrides"] == {"privacy_weight": 2.0}
    assert line["stprivacy"]["kept"] < 1.0 and line["1.0"]["kept"] == 1.0
    assert (tmp_path / "v1" / "train" / "stprivacy.pt").is_file()


def test_train_select_scores_candidates_on_held_out_training_videos(tmp_path, capsys):
    """`stpcore train --select` on real (synthetic) files: the validation part is held out of training, every
    phase-2 candidate is scored on it, and the chosen one is deployed as stprivacy.pt."""
    data = tmp_path / "synth"
    assert main(["data", "synth", str(data), "--videos", "42", "--seed", "0", "--width", "64", "--height", "48",
                 "--frames", "20"]) == 0
    out = tmp_path / "run"
    assert main(_train_args(data, out, "--phase1-epochs", "1", "--phase2-epochs", "2", "--validation", "0.3",
                            "--candidate-every", "1", "--select", "--select-epochs", "2")) == 0
    record = json.loads((out / "selection.json").read_text())
    assert [Path(c["path"]).name for c in record["candidates"]] == ["phase2-epoch001.pt", "phase2-epoch002.pt"]
    assert record["validation"] == 0.3 and set(record["raw"]["cmap"]) == {"vit", "stats"}
    chosen = Path(record["chosen"]["path"])
    assert (out / "stprivacy.pt").read_bytes() == chosen.read_bytes()
    # A selection stopped while it scored the second candidate goes on with `train --resume ... --select`: raw video
    # and the first candidate are read back, the second is scored again, and the choice is the same.
    (out / "selection" / "phase2-epoch002" / "result.json").unlink()
    (out / "selection.json").unlink()
    import signal

    from stpcore.evaluation import protocol

    scored = []
    real = protocol.evaluate_method
    args = _train_args(data, out, "--phase1-epochs", "1", "--phase2-epochs", "2", "--validation", "0.3",
                       "--candidate-every", "1", "--select", "--select-epochs", "2", "--resume", str(out / "last.pt"))

    def terminated(*a, **k):  # a service manager stops the job while it scores
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocol, "evaluate_method", terminated)
        assert main(args) == 130  # a clean stop, not the default handler's death
    assert "stopped: the selection was interrupted" in capsys.readouterr().err
    assert not (out / "selection.json").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocol, "evaluate_method", lambda t, cfg, *a, **k: scored.append(Path(cfg.out_dir).name)
                   or real(t, cfg, *a, **k))
        assert main(args) == 0
    assert scored == ["phase2-epoch002"]
    again = json.loads((out / "selection.json").read_text())
    assert again["chosen"] == record["chosen"] and again["candidates"][1]["top1"] == record["candidates"][1]["top1"]
    # The parts: disjoint, 21 + 7 of the 28 training videos; the validation part sampled like a test split.
    from stpcore.runtime import clip_loader

    common = dict(num_frames=8, crop=32, labels=data / "vp_labels.csv", decoder="pyav", stride=2, validation=0.3,
                  batch_size=2, workers=0)
    fit = clip_loader(data, train=True, part="fit", **common)
    val = clip_loader(data, train=True, part="validation", **common)
    assert len(fit.records) == 21 and len(val.records) == 7
    assert not {r.video_id for r in fit.records} & {r.video_id for r in val.records}
    batch = next(iter(val))
    assert batch.video_index.tolist() == [0] * 15 + [1] * 15 and batch.clip_index.max() == 14
