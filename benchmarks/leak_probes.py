"""Where does skin colour leak? Phase 3 of the demo (fresh ViT action and privacy recognizers on the demo's data)
on probes that keep one part of what STPrivacy outputs, or on fixed filters of the raw clips:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leak_probes.py mask --checkpoint RUN/train/stprivacy.pt \
        --data DEMO_DATA --workdir W --json-lines OUT.jsonl
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leak_probes.py edges --data DEMO_DATA --workdir W \
        --json-lines OUT.jsonl

Probes:
- ``mask``: the checkpoint's keep mask alone: every kept tubelet is +1, every dropped one 0 (read with the keep
  mask, as phase 3 reads STPrivacy), so all that is left is which tubelets were kept.
- ``edges``: the raw clip's grey level (channel mean), its absolute horizontal plus vertical differences per
  frame, in all three channels: a sign-free edge map, no colour.
- ``edges_norm``: the same, divided by each clip's largest value (no contrast scale either).

DEMO_DATA is a folder written by ``stpcore demo`` or ``benchmarks/privacy_methods.py`` (its ``data``). One JSON line
per probe: top-1 and the ViT attacker's cMAP and per-attribute AP. ``--gather OUT.json`` collects the lines into one
file, each under its name: the probe's, and for ``mask`` the run folder of its checkpoint (``mask base_s0`` for
``.../base_s0/train/stprivacy.pt``).

    .venv/bin/python benchmarks/leak_probes.py --gather OUT.json --json-lines OUT.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

PROBES = ("mask", "edges", "edges_norm")


def edge_map(clips: torch.Tensor, normalise: bool) -> torch.Tensor:
    """(B, 3, T, H, W) normalised clips -> the sign-free edge map of their grey level, (B, 3, T, H, W)."""
    grey = clips.mean(dim=1, keepdim=True)
    dx = F.pad(grey[..., :, 1:] - grey[..., :, :-1], (0, 1))
    dy = F.pad(grey[..., 1:, :] - grey[..., :-1, :], (0, 0, 0, 1))
    edges = dx.abs() + dy.abs()
    if normalise:
        edges = edges / edges.flatten(1).amax(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1, 1)
    return edges.expand(-1, 3, -1, -1, -1).contiguous()


def probe_name(line: dict) -> str:
    """``edges``, or ``mask <run>`` with <run> the folder above the checkpoint's ``train`` folder."""
    if line["checkpoint"] is None:
        return line["probe"]
    return f"{line['probe']} {Path(line['checkpoint']).parent.parent.name}"


def gather(lines_path: Path, out: Path) -> dict:
    """{"probes": {name: line}} from the JSON lines (the last line of a name wins)."""
    probes = {}
    for text in lines_path.read_text().splitlines():
        if text.strip():
            line = json.loads(text)
            probes[probe_name(line)] = line
    data = {"attacker": "vit", "probes": probes}
    out.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", nargs="?", choices=PROBES)
    parser.add_argument("--checkpoint", type=Path, help="the trained STPrivacy (mask only)")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json-lines", type=Path)
    parser.add_argument("--gather", type=Path, metavar="OUT.json", help="collect --json-lines into one file instead")
    args = parser.parse_args()
    if args.gather:
        if args.json_lines is None:
            parser.error("--gather needs --json-lines")
        gather(args.json_lines, args.gather)
        return
    if args.probe is None or args.data is None or args.workdir is None:
        parser.error("a probe needs PROBE, --data and --workdir")
    if args.probe == "mask" and args.checkpoint is None:
        parser.error("the mask probe needs --checkpoint")

    from stpcore.demo import DemoConfig, _loaders, eval_config
    from stpcore.evaluation.methods import MethodTransform, STPrivacyTransform
    from stpcore.evaluation.protocol import evaluate_method, load_checkpoint
    from stpcore.models import STPrivacyConfig
    from stpcore.tubelets import from_tubelets

    demo = DemoConfig()
    model_cfg = STPrivacyConfig.from_name(demo.preset)
    train_all, test = _loaders(demo, args.data, model_cfg.num_frames, model_cfg.image_size)
    ecfg = eval_config(demo, args.data, args.workdir / args.probe, attackers="vit", progress=False)

    if args.probe == "mask":
        class MaskOnly(STPrivacyTransform):
            def __call__(self, clips, video_ids=None, views=None):
                video, keep = super().__call__(clips, video_ids)
                cfg = self.model.cfg
                ones = keep[..., None].expand(*keep.shape, cfg.tubelet_dim).to(video.dtype)
                return from_tubelets(ones, cfg.grid, cfg.tubelet), keep

        model = load_checkpoint(args.checkpoint, ecfg)
        transform, backbone = MaskOnly(model), model.cfg
    else:
        class Edges(MethodTransform):
            def __call__(self, clips, video_ids=None, views=None):
                return edge_map(clips, normalise=args.probe == "edges_norm"), None

        transform, backbone = Edges(), model_cfg
    transform.name = f"probe-{args.probe}"
    result = evaluate_method(transform, ecfg, train_all, test, backbone=backbone)
    line = {"probe": args.probe, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "top1": result.top1, "cmap": result.cmap, "ap": result.ap, "seconds": round(result.seconds, 1)}
    print(json.dumps(line, default=float))
    if args.json_lines:
        with open(args.json_lines, "a") as f:
            f.write(json.dumps(line, default=float) + "\n")


if __name__ == "__main__":
    main()
