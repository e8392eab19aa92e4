"""``make demo`` / ``stpcore demo``: the main job on the built-in default.

Until the training pipeline lands, the demo runs the STPrivacy reference model (untrained, randomly
initialised weights) at inference on a generated clip and writes what it produces: the input clip, the
anonymized clip (dropped tubelets black), both side by side, and a keep-mask picture. The weights are
untrained, so the output shows the mechanics (which tubelets survive the three stages, exact black
where they do not), not a trained anonymizer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from stpcore import media
from stpcore.models import STPrivacy, STPrivacyConfig
from stpcore.tubelets import keep_to_pixels


def generated_clip(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """A uint8 (T, H, W, 3) clip: a figure (head and torso) walking across a textured room."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    room = np.stack([90 + 40 * np.sin(xx / 9.0), 110 + 30 * np.cos(yy / 7.0), 130 + 0 * xx], axis=-1)
    room += rng.normal(0, 6, room.shape)
    skin = np.array([224, 172, 135], dtype=np.float32)
    shirt = np.array([40, 90, 200], dtype=np.float32)
    clip = []
    for t in range(frames):
        cx = size * (0.2 + 0.6 * t / max(1, frames - 1))
        cy = size * 0.55 + 3 * np.sin(t)
        frame = room.copy()
        torso = ((xx - cx) / (size * 0.11)) ** 2 + ((yy - cy) / (size * 0.2)) ** 2 < 1
        head = (xx - cx) ** 2 + (yy - (cy - size * 0.27)) ** 2 < (size * 0.08) ** 2
        frame[torso] = shirt
        frame[head] = skin
        clip.append(frame)
    return np.clip(np.stack(clip), 0, 255).astype(np.uint8)


def normalise(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float (3, T, H, W) (ImageNet mean/std)."""
    x = torch.from_numpy(frames).float().div(255).permute(3, 0, 1, 2)
    mean = torch.tensor(media.IMAGENET_MEAN).reshape(3, 1, 1, 1)
    std = torch.tensor(media.IMAGENET_STD).reshape(3, 1, 1, 1)
    return (x - mean) / std


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = STPrivacyConfig.from_name(args.preset)
    model = STPrivacy(cfg).eval()
    frames = generated_clip(cfg.num_frames, cfg.image_size, seed=args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        result = model(normalise(frames)[None])
    seconds = time.perf_counter() - start
    mask = keep_to_pixels(result.keep[:1], cfg.grid, cfg.tubelet)[0]  # (1, T, H, W): dropped tubelets black
    anonymized = media.to_uint8(result.video[0], mask=mask)
    written = {
        "input": media.write_video(out / "input.mp4", frames, fps=8),
        "anonymized": media.write_video(out / "anonymized.mp4", anonymized, fps=8),
        "side_by_side": media.write_video(out / "side_by_side.mp4", media.side_by_side(frames, anonymized), fps=8),
        "keep_mask": media.save_png(out / "keep_mask.png", media.keep_mask_figure(
            frames, result.keep[0], cfg.grid, cfg.tubelet)),
    }
    kept = [int(d[0].sum()) for d in result.decisions]
    summary = {
        "preset": args.preset,
        "weights": "untrained (random initialisation)",
        "tokens": cfg.num_tokens,
        "kept_per_stage": kept,
        "seconds": round(seconds, 3),
        "files": {k: str(v) for k, v in written.items()},
    }
    with media.atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print(f"STPrivacy {args.preset} on a generated {cfg.num_frames}x{cfg.image_size}x{cfg.image_size} clip "
          f"({cfg.num_tokens} tubelets): kept {' -> '.join(map(str, kept))} in {seconds:.2f} s")
    print("NOTE: the weights are UNTRAINED (random initialisation): this shows the mechanics (which tubelets "
          "survive, dropped ones exactly black), not a trained anonymizer.")
    for name, path in written.items():
        print(f"  {name:<13} {path}")
    print(f"outputs in {out.resolve()}")
    return 0
