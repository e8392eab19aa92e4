"""Which preprocessing should the deployed model see? Keep masks and phase-3 numbers of the demo under each choice.

    .venv/bin/python benchmarks/preprocess_choice.py DEMO_OUT [--phase3] [--json OUT.json]

DEMO_OUT is a finished ``make demo`` folder (its data/ and train/stprivacy.pt). For every test video, the
frames of the centre view of each of its 5 evaluation clips go through four preprocessings:

- ``train``: the training and evaluation path (``data.preprocess``: short side 8/7 of the crop, torch's
  antialiased bilinear);
- ``ffmpeg_crop``: what ``stpcore anonymize`` did before (short side = the crop, FFmpeg's scaler via PyAV's
  ``reformat``, centre crop; the crop's origin is rounded as the evaluation rounds it, which can sit one
  pixel from the old ``(side - crop) // 2``);
- ``torch_crop``: torch's filter at the crop's scale (the scale alone);
- ``ffmpeg_train``: FFmpeg's scaler at the training scale (the filter alone).

The trained anonymizer (fp32, eval mode) decides its keep masks on each; the report gives, per choice, the
share of tubelet decisions equal to ``train``'s and the Jaccard index of the kept sets. With ``--phase3``
the demo's phase 3 (raw video and STPrivacy, fresh recognizers) is also run with the short side at the crop
(``short_side = crop``), to set beside the demo's own numbers at 8/7.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _ffmpeg_frames(path: Path, short_side: int) -> np.ndarray:
    """Every frame resized by FFmpeg's scaler (PyAV ``reformat``, its default filter) to this short side."""
    import av

    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            h, w = frame.height, frame.width
            scale = short_side / min(h, w)
            frame = frame.reformat(width=max(short_side, round(w * scale)), height=max(short_side, round(h * scale)),
                                   format="rgb24")
            out.append(frame.to_ndarray(format="rgb24"))
    return np.stack(out)


def _centre(frames: torch.Tensor, crop: int) -> torch.Tensor:
    """(T, 3, H, W) -> the centre crop (the evaluation's centre view)."""
    from stpcore.data.sampling import crop_origin

    h, w = frames.shape[-2:]
    y, x = crop_origin(h, crop, 0.5), crop_origin(w, crop, 0.5)
    return frames[..., y : y + crop, x : x + crop]


def keep_agreement(demo: Path) -> dict:
    from stpcore import media
    from stpcore.data.preprocess import normalize, to_working_scale, working_short_side
    from stpcore.data.sampling import eval_clips
    from stpcore.data.splits import list_records
    from stpcore.demo import DemoConfig
    from stpcore.models import load_anonymizer

    cfg = DemoConfig()
    model = load_anonymizer(demo / "train" / "stprivacy.pt").eval()
    crop, T = model.cfg.image_size, model.cfg.num_frames
    train_side = working_short_side(crop)
    records = list_records(demo / "data", train=False).records
    keeps: dict[str, list[torch.Tensor]] = {k: [] for k in ("train", "ffmpeg_crop", "torch_crop", "ffmpeg_train")}
    for rec in records:
        raw = np.stack(list(media.read_frames(rec.path)))
        variants = {
            "train": to_working_scale(raw, train_side),
            "torch_crop": to_working_scale(raw, crop),
            "ffmpeg_crop": torch.from_numpy(_ffmpeg_frames(rec.path, crop)).permute(0, 3, 1, 2),
            "ffmpeg_train": torch.from_numpy(_ffmpeg_frames(rec.path, train_side)).permute(0, 3, 1, 2),
        }
        specs = eval_clips(len(raw), T, cfg.stride)[1::3]  # the centre view of each temporal clip
        for name, frames in variants.items():
            clips = torch.stack([normalize(_centre(frames[s.frames], crop)) for s in specs])
            with torch.no_grad():
                keeps[name].append(model(clips).keep.bool())
    ref = torch.cat(keeps["train"])
    report = {"videos": len(records), "clips": int(ref.shape[0]), "tubelets_per_clip": int(ref.shape[1]), "choices": {}}
    for name, k in keeps.items():
        k = torch.cat(k)
        same = (k == ref).float().mean().item()
        jaccard = ((k & ref).sum(1).float() / (k | ref).sum(1).clamp(min=1).float()).mean().item()
        report["choices"][name] = {"same_decision": round(same, 4), "jaccard": round(jaccard, 4)}
    return report


def phase3_at_crop_scale(demo: Path, out: Path) -> dict:
    from stpcore.demo import DemoConfig, eval_config
    from stpcore.evaluation import evaluate
    from stpcore.models import STPrivacyConfig
    from stpcore.runtime import clip_loader

    cfg = DemoConfig()
    model_cfg = STPrivacyConfig.from_name(cfg.preset)
    crop, data = model_cfg.image_size, demo / "data"
    common = dict(labels=data / "vp_labels.csv", num_frames=model_cfg.num_frames, crop=crop, stride=cfg.stride,
                  decoder="pyav", cache=True, seed=cfg.seed, short_side=crop)
    train = clip_loader(data, train=True, batch_size=cfg.batch_size, **common)
    test = clip_loader(data, train=False, batch_size=8, **common)
    start = time.perf_counter()
    results = evaluate(eval_config(cfg, data, out, short_side=crop), checkpoint=demo / "train" / "stprivacy.pt",
                       methods=("raw", "stprivacy"), train_loader=train, test_loader=test)
    return {"short_side": crop, "seconds": round(time.perf_counter() - start, 1),
            "results": {r.method: {"top1": round(r.top1, 2), "cmap": round(r.cmap, 2)}
                        for r in results}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a finished make demo folder")
    parser.add_argument("--phase3", action="store_true", help="also run phase 3 with the short side at the crop")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {"keep_masks": keep_agreement(args.demo)}
    for name, row in report["keep_masks"]["choices"].items():
        print(f"{name:14} same decision {row['same_decision']:.4f}  jaccard {row['jaccard']:.4f}")
    if args.phase3:
        report["phase3_crop_scale"] = phase3_at_crop_scale(args.demo, args.demo / "eval_crop_scale")
        print(json.dumps(report["phase3_crop_scale"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
