"""The attacker zoo of phase 3: each attacker learns a visible attribute, the worst case is the smallest drop,
appearance features describe only the visible pixels, and bad attacker names are refused."""

from __future__ import annotations

import math

import pytest
import torch

from stpcore.evaluation import EvalConfig, MethodResult, evaluate_method, make_transform, results_table
from stpcore.evaluation.attackers import ATTACKERS, FrameCNN, appearance_features
from stpcore.evaluation.results import worst_case
from tests.evaluation.clips import TintLoader


def _cfg(tmp_path, **kw) -> EvalConfig:
    base = dict(data_root="unused", out_dir=str(tmp_path / "eval"), preset="tiny", epochs=6, batch_size=8,
                base_lr=0.5, warmup_epochs=0.5, progress=False, device="cpu")
    return EvalConfig(**(base | kw))


def test_every_attacker_learns_a_visible_attribute_on_raw_video(tmp_path):
    result = evaluate_method(make_transform("raw"), _cfg(tmp_path), TintLoader(48, 8, True), TintLoader(24, 6, False))
    assert list(result.attackers) == list(ATTACKERS)
    for name, scores in result.attackers.items():
        assert scores["ap"]["skin_color"] > 0.9, (name, scores["ap"])  # chance: the prevalence, 0.5
    assert result.cmap == result.attackers["vit"]["cmap"]  # the headline figures stay the ViT's
    lines = (tmp_path / "eval" / "eval_metrics.jsonl").read_text().splitlines()
    assert '"frame_cnn"' in lines[-1] and '"stats"' in lines[-1]


def test_without_privacy_labels_every_attacker_reports_nan_instead_of_failing(tmp_path):
    class Unlabelled(TintLoader):
        def __iter__(self):
            for b in super().__iter__():
                b.has_privacy[:] = False
                yield b

    result = evaluate_method(make_transform("raw"), _cfg(tmp_path, epochs=1), Unlabelled(12, 6, True),
                             Unlabelled(6, 6, False))
    assert all(math.isnan(a["cmap"]) for a in result.attackers.values()) and math.isnan(result.cmap)


def test_attackers_can_be_chosen_and_the_headline_follows(tmp_path):
    result = evaluate_method(make_transform("raw"), _cfg(tmp_path, attackers="stats", epochs=2),
                             TintLoader(24, 8, True), TintLoader(12, 6, False))
    assert list(result.attackers) == ["stats"] and result.cmap == result.attackers["stats"]["cmap"]


def _result(method: str, cmaps: dict[str, float], aps: dict[str, dict[str, float]]) -> MethodResult:
    attackers = {n: {"cmap": c, "f1": 0.5, "ap": aps[n], "f1_per_attribute": {}, "skipped_attributes": []}
                 for n, c in cmaps.items()}
    return MethodResult(method=method, top1=50.0, cmap=cmaps.get("vit", math.nan), f1=0.5, ap=aps.get("vit", {}),
                        f1_per_attribute={}, skipped_attributes=[], num_test_videos=10, num_privacy_videos=10,
                        kept_fraction=0.3, seconds=1.0, epochs=1, attackers=attackers)


def test_worst_case_is_the_best_attack_and_the_highest_ap_per_attribute():
    ap = lambda a, b: {"skin_color": a, "face": b}  # noqa: E731
    raw = _result("raw", {"vit": 80.0, "frame_cnn": 70.0, "stats": 75.0},
                  {"vit": ap(0.9, 0.7), "frame_cnn": ap(0.8, 0.6), "stats": ap(0.85, 0.65)})
    ours = _result("stprivacy@0.7", {"vit": 60.0, "frame_cnn": 62.0, "stats": 70.0},
                   {"vit": ap(0.5, 0.7), "frame_cnn": ap(0.66, 0.58), "stats": ap(0.8, 0.6)})
    w = worst_case(raw, ours)
    assert w["drops"] == {"vit": 20.0, "frame_cnn": 8.0, "stats": 5.0}
    # The best attack on the output (stats, 70) against the best on raw video (vit, 80); the smallest per-attacker
    # drop (stats, 5) would credit the output with less privacy than the attacks lost.
    assert w["worst_drop"] == 10.0 and w["best_attacker"] == "stats"
    assert w["max_ap"] == {"skin_color": 0.8, "face": 0.7}
    undefined = _result("x", {"vit": math.nan, "stats": 71.0}, {"vit": ap(math.nan, math.nan), "stats": ap(0.7, 0.6)})
    w = worst_case(raw, undefined)
    # The ViT reads raw video (80) but has no score on this output (it diverged): it may be the strongest, so there
    # is no worst case, rather than the statistics attacker's.
    assert math.isnan(w["drops"]["vit"]) and math.isnan(w["worst_drop"]) and w["best_attacker"] == ""
    assert w["max_ap"]["skin_color"] == 0.7
    markdown, csv = results_table([raw, ours], "hmdb51")
    assert "## Privacy attackers" in markdown
    assert "| stprivacy@0.7 | 10.00 | stats | 80.00 | 70.00 |" in markdown
    assert "| stprivacy@0.7 | frame_cnn | 62.00 | .500 | 66.00 | 58.00 | 8.00 |" in markdown
    header, _, ours_row = csv.splitlines()[:3]
    assert header.endswith("cmap_vit,cmap_frame_cnn,cmap_stats,worst_drop,best_attacker")
    assert ours_row.endswith("60,62,70,10,stats")


def test_a_weak_attacker_does_not_pin_the_worst_case():
    """The review's case: raw video read at 80 by the ViT and 52 by a weak attacker. A reads 78 / 40, B 50 / 51.
    B leaks far less (no attacker reads more than 51), but by the smallest per-attacker drop A (2.0) beat B (1.0),
    and the selection would have deployed A."""
    from stpcore.evaluation.selection import choose

    raw = _result("raw", {"vit": 80.0, "stats": 52.0}, {"vit": {}, "stats": {}})
    a = worst_case(raw, _result("a", {"vit": 78.0, "stats": 40.0}, {"vit": {}, "stats": {}}))
    b = worst_case(raw, _result("b", {"vit": 50.0, "stats": 51.0}, {"vit": {}, "stats": {}}))
    assert (a["worst_drop"], a["best_attacker"]) == (2.0, "vit")
    assert (b["worst_drop"], b["best_attacker"]) == (29.0, "stats")
    scores = [{"top1": 70.0, "worst_drop": a["worst_drop"]}, {"top1": 70.0, "worst_drop": b["worst_drop"]}]
    assert choose(scores, raw_top1=70.0, target=15.0)[0] == 1


def test_appearance_features_describe_only_the_visible_pixels():
    torch.manual_seed(0)
    clip = torch.randn(1, 3, 4, 16, 16)
    half = clip.clone()
    half[..., 8:] = 0  # dropped tubelets: exactly the blank (normalised mean colour)
    full_left = appearance_features(clip[..., :8])
    only_left = appearance_features(half)
    # Moments and histograms see the same pixels; the visible fraction halves.
    torch.testing.assert_close(only_left[:, :33], full_left[:, :33], rtol=1e-5, atol=1e-5)
    assert only_left[0, -1] == pytest.approx(0.5) and full_left[0, -1] == pytest.approx(1.0)
    hist = only_left[0, 9:33].view(3, 8)
    torch.testing.assert_close(hist.sum(1), torch.ones(3))
    assert torch.equal(appearance_features(torch.zeros(2, 3, 4, 8, 8)), torch.zeros(2, 40))
    # Texture: only pairs of visible neighbours count. A visible half of one colour beside a blank half has no
    # difference; an alternating pattern differs by its step horizontally and not vertically.
    flat = torch.zeros(1, 3, 2, 8, 8)
    flat[..., :4] = 1.0
    assert torch.equal(appearance_features(flat)[0, 33:39], torch.zeros(6))
    stripes = torch.zeros(1, 3, 2, 8, 8) + 0.5
    stripes[..., ::2] = 1.5  # normalised: columns alternate between two colours
    tex = appearance_features(stripes)[0, 33:39]
    assert (tex[:3] > 0.1).all() and torch.equal(tex[3:], torch.zeros(3))


def test_frame_cnn_maps_clips_to_attribute_logits():
    net = FrameCNN((8, 16), 5)
    assert net(torch.randn(2, 3, 4, 32, 32), torch.ones(2, 64)).shape == (2, 5)


@pytest.mark.parametrize("value, match", [
    ("vit,cnn", r"unknown attacker\(s\) \['cnn'\]; choose from \['vit', 'frame_cnn', 'stats'\]"),
    ("", "no attacker given"),
    ("vit,vit", "attackers repeated"),
])
def test_bad_attacker_names_are_refused_with_the_choices(tmp_path, value, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, attackers=value)


def test_eval_cli_refuses_an_unknown_attacker(tmp_path, capsys):
    from stpcore.cli import main

    assert main(["eval", "--data-root", str(tmp_path), "--attackers", "vit,resnet", "--no-progress"]) == 2
    assert "choose from ['vit', 'frame_cnn', 'stats']" in capsys.readouterr().err
