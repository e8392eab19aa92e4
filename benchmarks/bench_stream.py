"""Live-stream anonymization on this CPU: latency from a frame's arrival to its anonymized output, and the largest
frame rate held without dropping a frame (issue 18).

    .venv/bin/python benchmarks/bench_stream.py [--models tiny,vit_small] [--size 320x240] [--seconds 12]
        [--json benchmarks/results/cpu-stream.json]

Per model (the demo's preset "tiny", and "vit_small"; random weights with separated keep scores, which cost what
trained ones cost): first a slow stream measures the model side's seconds per chunk (one clip of frames: resize,
model windows, the model, stitching, encoding; median), which gives the rate it could sustain, num_frames /
seconds per chunk (the model alone, ``WindowAnonymizer`` on one chunk, is recorded beside it). Then a
real-time MPEG-TS stream (MPEG-4 part 2) of synthetic frames is sent over UDP on the loopback address at rates around
that estimate, each for ``--seconds``, and ``stpcore.stream.anonymize_stream`` anonymizes it: frames in, out and
dropped, and the latency percentiles of each whole chunk's longest-waiting frame (its first), without the last whole
chunk, whose final frame the demuxer holds until the sender stops (``latency_all``: every frame, that chunk
included). The largest rate tried with no frame dropped is reported.
The sender runs in the same process (its encoding takes some CPU from the model).
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


def _frames(n: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    frames = np.full((n, height, width, 3), 110, dtype=np.uint8) + rng.integers(0, 8, (n, height, width, 3),
                                                                                 dtype=np.uint8)
    for i in range(n):
        x = (5 + 3 * i) % (width - width // 5)
        frames[i, height // 4: height // 2, x: x + width // 5] = (230, 180, 150)
    return frames


def _send(port: int, frames: np.ndarray, fps: float, seconds: float) -> None:
    import av

    time.sleep(0.5)
    with av.open(f"udp://127.0.0.1:{port}?pkt_size=1316", "w", format="mpegts") as out:
        stream = out.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qscale": "4"}
        start = time.monotonic()
        n = int(seconds * fps)
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")):
                out.mux(packet)
            delay = start + (i + 1) / fps - time.monotonic()  # real time, without drift
            if delay > 0:
                time.sleep(delay)
        for packet in stream.encode():
            out.mux(packet)


def _chunk_latency(report) -> dict:
    """Percentiles of each whole chunk's longest frame latency (its first frame's), leaving out the last whole chunk,
    whose final frame the demuxer held until the sender fell silent."""
    values = [lat for _, lat in list(report.chunk_latency)[:-1]]
    if not values:
        return {}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "max": max(values)}


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_flags() -> str:
    try:
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit_small")
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--factors", default="0.7,0.9,1.1", help="rates tried, as fractions of the compute estimate")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from stpcore.anonymize import WindowAnonymizer, plan_windows
    from stpcore.data.preprocess import to_working_scale, working_short_side
    from stpcore.inference import ClipAnonymizer
    from stpcore.models import STPrivacy, STPrivacyConfig
    from stpcore.stream import anonymize_stream
    from stpcore.testing import separate_keep_scores

    width, height = (int(v) for v in args.size.split("x"))
    frames = _frames(100, width, height)
    record = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "size": [width, height],
              "seconds_per_rate": args.seconds, "command": "benchmarks/bench_stream.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json" and v is not None),
              "models": {}}
    for preset in args.models.split(","):
        torch.manual_seed(0)
        model = separate_keep_scores(STPrivacy(STPrivacyConfig.from_name(preset)), scale=10.0)
        anonymizer = ClipAnonymizer(model)
        cfg = anonymizer.cfg
        work = to_working_scale(frames[: cfg.num_frames], working_short_side(cfg.image_size))
        grid = plan_windows(*work.shape[-2:], cfg.image_size)
        runner = WindowAnonymizer(anonymizer, grid, batch_size=8)
        runner.run([work])  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            runner.run([work])
            times.append(time.perf_counter() - start)
        model_only = statistics.median(times)

        def live(fps: float, seconds: float, anonymizer=anonymizer):
            port = _free_udp_port()
            sender = threading.Thread(target=_send, args=(port, frames, fps, seconds), daemon=True)
            sender.start()
            with tempfile.TemporaryDirectory() as out:
                report = anonymize_stream(f"udp://127.0.0.1:{port}", out, anonymizer, segment_seconds=5.0, timeout=3)
            sender.join()
            return report

        # The whole model side per chunk (resize, windows, model, stitching, encoding), from a slow stream.
        probe = live(min(25.0, 0.5 * cfg.num_frames / model_only), 4.0)
        per_chunk = statistics.median(probe.chunk_seconds)
        estimate = cfg.num_frames / per_chunk
        entry = {"description": anonymizer.description, "windows": len(grid), "num_frames": cfg.num_frames,
                 "model_seconds_per_chunk": model_only, "seconds_per_chunk": per_chunk, "estimated_fps": estimate,
                 "runs": []}
        for factor in (float(f) for f in args.factors.split(",")):
            fps = max(1.0, round(estimate * factor, 1))
            report = live(fps, args.seconds)
            run = {"fps": fps, "factor": factor, "frames_in": report.frames_in, "frames_out": report.frames_out,
                   "frames_dropped": report.frames_dropped, "latency_all": report.latency,
                   "latency": _chunk_latency(report),
                   "chunk_seconds_p50": statistics.median(report.chunk_seconds) if report.chunk_seconds else None,
                   "clip_seconds": cfg.num_frames / fps}
            entry["runs"].append(run)
            print(preset, json.dumps(run), flush=True)
        # Held: nothing dropped by the model side, and (almost) every frame sent arrived: UDP loss or a sender that
        # could not keep the rate would otherwise pass for a held rate.
        held = [r["fps"] for r in entry["runs"] if r["frames_dropped"] == 0
                and r["frames_in"] >= 0.98 * int(args.seconds * r["fps"]) - 2]
        entry["max_fps_without_drops"] = max(held) if held else None
        record["models"][preset] = entry
    print(json.dumps(record, indent=1))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
