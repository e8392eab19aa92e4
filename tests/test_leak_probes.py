"""benchmarks/leak_probes.py: its edge map is sign-free and colour-free, and its gather names each probe."""

from __future__ import annotations

import json

import torch

from benchmarks.leak_probes import edge_map, gather


def test_edge_map_has_no_sign_no_colour_and_normalises_per_clip():
    torch.manual_seed(0)
    clips = torch.randn(2, 3, 4, 8, 8)
    edges = edge_map(clips, normalise=False)
    assert edges.shape == clips.shape and (edges >= 0).all()
    torch.testing.assert_close(edge_map(-clips, normalise=False), edges)  # a dark-on-light edge = light-on-dark
    swapped = clips[:, [2, 0, 1]]  # the same grey level in other colours
    torch.testing.assert_close(edge_map(swapped, normalise=False), edges)
    assert torch.equal(edges[:, 0], edges[:, 2])
    flat = torch.zeros_like(clips)
    flat[:, :, :, :, 4:] = 1.0  # one vertical edge per frame
    got = edge_map(flat, normalise=False)
    assert got[..., 3].eq(1.0).all() and got[..., :3].eq(0).all() and got[..., 4:].eq(0).all()
    normed = edge_map(clips * torch.tensor([1.0, 5.0]).view(2, 1, 1, 1, 1), normalise=True)
    torch.testing.assert_close(normed.flatten(1).amax(dim=1), torch.ones(2))
    torch.testing.assert_close(normed[1], edge_map(clips, normalise=True)[1])  # no contrast scale left


def test_gather_names_mask_probes_by_their_run(tmp_path):
    lines = tmp_path / "probes.jsonl"
    base = {"top1": 14.3, "cmap": 62.1, "ap": {"skin_color": 0.79}, "seconds": 1.0}
    lines.write_text("\n".join(json.dumps(d) for d in (
        {"probe": "mask", "checkpoint": "/w/base_s0/train/stprivacy.pt", **base},
        {"probe": "edges", "checkpoint": None, **base},
        {"probe": "edges", "checkpoint": None, **base, "cmap": 90.0},  # a rerun: the last line wins
    )) + "\n")
    data = gather(lines, tmp_path / "out.json")
    assert sorted(data["probes"]) == ["edges", "mask base_s0"]
    assert data["probes"]["edges"]["cmap"] == 90.0
    assert json.loads((tmp_path / "out.json").read_text()) == data
