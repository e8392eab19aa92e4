"""What turning videos stored sideways costs the DALI decoder: a batch that needs the turn against one that does not.

    .venv/bin/python benchmarks/dali_rotation.py [--rounds 15] [--json OUT.json]

One 320x240 VP9 video (synthetic) is decoded as 8 clips of 16 frames (stride 2) by one ``DaliClipDecoder`` on
DALI-CPU (2 threads): once as stored (``turns=0``: the pipeline without ``fn.rotate``) and once turned half round
(``turns=2``: the pipeline with it; the same frame size, so only the turn differs). Each round times one batch of
each, in alternating order; the figure is the median over rounds of turned time / plain time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ab import cpu_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from stpcore.data.decode_dali import DaliClipDecoder, DaliItem
    from stpcore.data.sampling import ClipSpec
    from stpcore.data.synth import render_video, write_video

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.webm"
        write_video(path, render_video(5, np.array([1, 1, 1, 0, 1]), np.random.default_rng(0), 320, 240, 40))
        specs = [ClipSpec(np.arange(i, i + 32, 2), 0.5, 0.5, False) for i in range(8)]
        decoder = DaliClipDecoder("cpu", max_batch=8, num_threads=2)
        batches = {turns: [DaliItem(path, 240, 320, s, turns) for s in specs] for turns in (0, 2)}
        for items in batches.values():  # warm-up: builds both pipelines
            decoder.decode(items)
        ratios, seconds = [], {0: [], 2: []}
        for r in range(args.rounds):
            for turns in ((0, 2) if r % 2 == 0 else (2, 0)):
                t0 = time.perf_counter()
                decoder.decode(batches[turns])
                seconds[turns].append(time.perf_counter() - t0)
            ratios.append(seconds[2][-1] / seconds[0][-1])
    result = {"cpu_flags": cpu_flags(), "rounds": args.rounds, "plain_s": statistics.median(seconds[0]),
              "turned_s": statistics.median(seconds[2]), "turned_over_plain": statistics.median(ratios)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
