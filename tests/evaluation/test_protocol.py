"""Phase 3: metrics, the methods' transforms, fresh recognizers end to end, tables, the trade-off sweep."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from stpcore.evaluation import (
    EvalConfig,
    MethodResult,
    STPrivacyTransform,
    SweepPoint,
    evaluate,
    evaluate_method,
    make_transform,
    paper_table,
    results_table,
    sweep,
    video_metrics,
    write_results,
    write_sweep,
)
from stpcore.models import STPrivacy, STPrivacyConfig, save_anonymizer
from stpcore.tubelets import to_tubelets
from tests.evaluation.clips import BandLoader, C, S, T


def _cfg(tmp_path, **kw) -> EvalConfig:
    base = dict(data_root="unused", out_dir=str(tmp_path / "eval"), preset="tiny", epochs=4, batch_size=8,
                base_lr=0.5, warmup_epochs=0.5, progress=False, device="cpu")
    base.update(kw)
    return EvalConfig(**base)


def _tiny_checkpoint(tmp_path) -> tuple[STPrivacy, str]:
    torch.manual_seed(1)
    model = STPrivacy(STPrivacyConfig.from_name("tiny", num_classes=C)).eval()
    path = tmp_path / "stprivacy.pt"
    save_anonymizer(model, path, classes=[f"class{i}" for i in range(C)])
    return model, str(path)


# -- metrics ----------------------------------------------------------------------------------------


def test_top1_averages_views_per_video():
    # Video 0 (label 0): one confident right view, two mildly wrong ones: the per-clip majority says class 1,
    # the mean probability says class 0. Video 1 (label 1): all views right.
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]])
    actions = torch.tensor([0, 0, 0, 1, 1, 1])
    video_index = torch.tensor([7, 7, 7, 3, 3, 3])
    per_clip = (probs.argmax(-1) == actions).float().mean().item()
    privacy = torch.zeros(6, 5)
    m = video_metrics(probs, actions, torch.rand(6, 5), privacy, torch.zeros(6, dtype=torch.bool), video_index)
    assert m.top1 == pytest.approx(100.0) and per_clip == pytest.approx(4 / 6)
    assert m.num_videos == 2 and m.num_privacy_videos == 0
    assert math.isnan(m.cmap) and math.isnan(m.f1)
    # Without grouping (every clip its own video) the wrong views count.
    m = video_metrics(probs, actions, torch.rand(6, 5), privacy, torch.zeros(6, dtype=torch.bool), torch.arange(6))
    assert m.top1 == pytest.approx(100 * 4 / 6)


def test_cmap_and_f1_match_sklearn_on_averaged_views():
    g = torch.Generator().manual_seed(0)
    V, views = 40, 3
    labels = torch.randint(0, 2, (V, 5), generator=g).float()
    labels[0], labels[1] = 1.0, 0.0  # every attribute has both classes
    has = torch.ones(V, dtype=torch.bool)
    has[::7] = False  # these videos must not count
    probs = torch.rand(V * views, 5, generator=g)
    video_index = torch.arange(V).repeat_interleave(views)
    per_clip_labels = labels[video_index]
    per_clip_labels[~has[video_index]] = 0.0
    m = video_metrics(torch.rand(V * views, C, generator=g), torch.zeros(V * views, dtype=torch.long), probs,
                      per_clip_labels, has[video_index], video_index)
    mean = probs.reshape(V, views, 5).mean(1)[has].numpy()
    y = labels[has].numpy().astype(int)
    ap = [average_precision_score(y[:, a], mean[:, a]) for a in range(5)]
    f1 = [f1_score(y[:, a], mean[:, a] > 0.5, zero_division=0) for a in range(5)]
    assert m.cmap == pytest.approx(100 * np.mean(ap), abs=1e-9)
    assert m.f1 == pytest.approx(np.mean(f1), abs=1e-12)
    assert list(m.ap.values()) == pytest.approx(ap) and m.skipped_attributes == []
    assert m.num_privacy_videos == int(has.sum())


def test_attribute_with_one_class_is_left_out_of_cmap_and_f1():
    g = torch.Generator().manual_seed(1)
    V = 30
    labels = torch.randint(0, 2, (V, 5), generator=g).float()
    labels[0, :], labels[1, :] = 1.0, 0.0
    labels[:, 3] = 0.0  # "nudity" never present in the test split
    probs = torch.rand(V, 5, generator=g)
    m = video_metrics(torch.rand(V, C), torch.zeros(V, dtype=torch.long), probs, labels,
                      torch.ones(V, dtype=torch.bool), torch.arange(V))
    assert m.skipped_attributes == ["nudity"] and math.isnan(m.ap["nudity"])
    defined = [average_precision_score(labels[:, a].int().numpy(), probs[:, a].numpy()) for a in (0, 1, 2, 4)]
    assert m.cmap == pytest.approx(100 * np.mean(defined))
    # F1 leaves it out too: with no positive video its F1 is 0 whatever the predictions, which would read as
    # privacy. A perfect predictor scores F1 = 1, as it scores cMAP = 100.
    assert math.isnan(m.f1_per_attribute["nudity"])
    f1 = [f1_score(labels[:, a].int().numpy(), probs[:, a].numpy() > 0.5, zero_division=0) for a in (0, 1, 2, 4)]
    assert m.f1 == pytest.approx(np.mean(f1), abs=1e-12)
    perfect = video_metrics(torch.rand(V, C), torch.zeros(V, dtype=torch.long), labels.clone(), labels,
                            torch.ones(V, dtype=torch.bool), torch.arange(V))
    assert perfect.cmap == pytest.approx(100.0) and perfect.f1 == pytest.approx(1.0)


def test_non_finite_scores_give_undefined_metrics_not_an_error():
    """A recognizer that diverged: scikit-learn raised on its NaN scores (after all of phase 3's training), and the
    action top-1 took argmax over NaN as a prediction."""
    g = torch.Generator().manual_seed(0)
    video = torch.arange(8).repeat_interleave(2)
    actions, privacy = (video % 3), (torch.rand(8, 5, generator=g) > 0.5).float()[video]
    privacy[:2, :] = torch.tensor([0.0, 0.0])[:, None]  # both classes in every attribute
    privacy[2:4, :] = 1.0
    probs, scores = torch.rand(16, 3, generator=g).softmax(-1), torch.rand(16, 5, generator=g)
    has = torch.ones(16, dtype=torch.bool)
    fine = video_metrics(probs, actions, scores, privacy, has, video)
    assert not math.isnan(fine.top1) and not math.isnan(fine.cmap)
    probs[3, 0], scores[5, 2] = math.nan, math.nan
    m = video_metrics(probs, actions, scores, privacy, has, video)
    assert math.isnan(m.top1) and math.isnan(m.cmap) and math.isnan(m.f1)
    assert all(math.isnan(v) for v in m.ap.values()) and m.num_videos == 8


def test_inconsistent_view_labels_raise():
    with pytest.raises(ValueError, match="views of one video"):
        video_metrics(torch.rand(2, C), torch.tensor([0, 1]), torch.rand(2, 5), torch.zeros(2, 5),
                      torch.ones(2, dtype=torch.bool), torch.tensor([0, 0]))


def test_masked_privacy_loss_equals_bce_over_labelled_clips():
    from stpcore.losses import masked_privacy_loss, privacy_loss

    logits, labels = torch.randn(6, 5), torch.randint(0, 2, (6, 5)).float()
    for has in (torch.ones(6, dtype=torch.bool), torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)):
        assert masked_privacy_loss(logits, labels, has).item() == pytest.approx(
            privacy_loss(logits[has], labels[has]).item(), abs=1e-6)
    assert masked_privacy_loss(logits, labels, torch.zeros(6, dtype=torch.bool)).item() == 0.0


# -- transforms -------------------------------------------------------------------------------------


def _clips(B=2, H=S):
    torch.manual_seed(3)
    return torch.randn(B, 3, T, H, H) + 0.3


@pytest.mark.parametrize("name", ["raw", "downsample2", "downsample4", "blur_weak", "blur_strong"])
def test_baseline_transforms_keep_shape_and_mean(name):
    clips = _clips()
    t = make_transform(name)
    video, keep = t(clips)
    assert video.shape == clips.shape and video.dtype == clips.dtype and keep is None and t.keep_mode is None
    assert t.name == name
    if name == "raw":
        assert torch.equal(video, clips)
        return
    assert not torch.allclose(video, clips, atol=1e-2)
    per_frame_mean = clips.mean(dim=(-1, -2))
    assert torch.allclose(video.mean(dim=(-1, -2)), per_frame_mean, atol=0.05)
    assert video.std() < clips.std()  # detail removed


def test_stronger_baselines_remove_more_detail():
    clips = _clips()
    residual = {n: (make_transform(n)(clips)[0] - clips).pow(2).mean().item()
                for n in ("downsample2", "downsample4", "blur_weak", "blur_strong")}
    assert residual["downsample4"] > residual["downsample2"]
    assert residual["blur_strong"] > residual["blur_weak"]


def test_downsample_is_blockwise_mean():
    clips = _clips(B=1)
    video, _ = make_transform("downsample4")(clips)
    block = clips[0, 1, 2, 4:8, 8:12]
    assert torch.allclose(video[0, 1, 2, 4:8, 8:12], block.mean().expand(4, 4), atol=1e-6)


def test_blacken_zeroes_the_box_only():
    clips = _clips(B=3)
    boxes = {"a/v0": (0.25, 0.5, 0.75, 1.0), "a/v2": (0.0, 0.0, 0.5, 0.5)}
    t = make_transform("blacken", boxes=boxes)
    video, keep = t(clips, ["a/v0", "a/v1", "a/v2"])
    assert keep is None and video.shape == clips.shape
    assert (video[0, :, :, 16:32, 8:24] == 0).all() and (video[2, :, :, 0:16, 0:16] == 0).all()
    outside = torch.ones_like(clips, dtype=torch.bool)
    outside[0, :, :, 16:32, 8:24] = False
    outside[2, :, :, 0:16, 0:16] = False
    assert torch.equal(video[outside], clips[outside])  # video 1 has no box: untouched
    assert t.missing == {"a/v1"}
    with pytest.raises(ValueError, match="video_ids"):
        t(clips)
    with pytest.raises(ValueError, match="boxes"):
        make_transform("blacken")
    with pytest.raises(ValueError, match="x0"):
        make_transform("blacken", boxes={"a/v0": (0.8, 0.0, 0.2, 1.0)})


def test_stprivacy_transform_drops_exact_zeros_with_equal_counts():
    model = STPrivacy(STPrivacyConfig.from_name("tiny", num_classes=C))
    cfg = model.cfg
    clips = _clips(B=3)
    for ratio in (0.7, 0.5):
        t = make_transform("stprivacy", anonymizer=model, keep_ratio=ratio)
        video, keep = t(clips)
        assert t.keep_mode == "gather" and not model.training
        assert video.shape == clips.shape and keep.shape == (3, cfg.num_tokens)
        counts = keep.sum(1)
        assert (counts == cfg.num_slots * cfg.kept_per_slot(ratio)[-1]).all()
        # Dropped tubelets are exactly zero; kept ones are the reconstruction (not all zero).
        tubes = to_tubelets(video, cfg.tubelet)  # (B, N, pixels) in t-major token order
        assert (tubes[keep == 0] == 0).all() and (tubes[keep == 1].abs().sum(-1) > 0).all()
    adaptive = STPrivacyTransform(model, threshold=0.5)
    video, keep = adaptive(clips)
    assert adaptive.keep_mode == "policy" and set(keep.unique().tolist()) <= {0.0, 1.0}
    assert not any(p.requires_grad for p in model.parameters())


# -- end to end -------------------------------------------------------------------------------------


def test_evaluate_method_learns_the_action(tmp_path):
    cfg = _cfg(tmp_path)
    train = BandLoader(num_videos=48, batch_videos=8, train=True)
    test = BandLoader(num_videos=15, batch_videos=4, train=False, views=3, seed=1)
    result = evaluate_method(make_transform("raw"), cfg, train, test)
    assert result.method == "raw" and result.epochs == 4
    assert result.top1 >= 80.0, result  # chance is 33 %
    assert result.num_test_videos == 15 and result.num_privacy_videos == 12
    assert 0.0 <= result.cmap <= 100.0 and 0.0 <= result.f1 <= 1.0 and result.kept_fraction == 1.0
    assert set(result.ap) == set(result.f1_per_attribute) == {"skin_color", "face", "gender", "nudity",
                                                              "relationship"}
    assert all(0 <= v <= 1 for v in result.ap.values() if not math.isnan(v))
    lines = [json.loads(x) for x in (tmp_path / "eval" / "eval_metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3] and all(r["method"] == "raw" for r in lines)
    assert epochs[-1]["ce_action"] < epochs[0]["ce_action"]
    # The privacy recognizer learns too: attribute 0 follows the action band by construction.
    assert epochs[-1]["bce_privacy"] < 0.9 * epochs[0]["bce_privacy"], epochs
    assert result.f1_per_attribute["skin_color"] >= 0.9, result.f1_per_attribute
    assert lines[-1]["test"]["top1"] == pytest.approx(result.top1)


@pytest.mark.parametrize("attackers", ["vit", "vit,stats"])
def test_a_train_split_with_no_readable_video_is_an_error(tmp_path, attackers):
    """Every training video skipped (unreadable, or H.264 under DALI on a CPU): the recognizers would be scored
    untrained, at chance, as if trained (with the stats attacker it failed with an unrelated unpacking error)."""

    class Unreadable(BandLoader):
        def __iter__(self):
            return iter(())

        def report(self):
            return type("Report", (), {"counts": {"unreadable": self.num_videos}})()

    cfg = _cfg(tmp_path, epochs=1, attackers=attackers)
    test = BandLoader(num_videos=6, batch_videos=3, train=False, views=3, seed=1)
    with pytest.raises(ValueError, match=r"raw epoch 1: no training clip could be read; every video was skipped "
                                         r"\(\{'unreadable': 8\}\)"):
        evaluate_method(make_transform("raw"), cfg, Unreadable(num_videos=8, batch_videos=4, train=True), test)


def test_recognizers_with_non_finite_outputs_are_noted_and_the_result_kept(tmp_path):
    """Non-finite test outputs (here from a test video whose pixel overflows; in practice a recognizer that
    diverged): the evaluation ends with NaN scores, a note naming the recognizers and a warning, and saves its
    result, instead of a scikit-learn error after all of its training."""

    class OneNanVideo(BandLoader):
        def paint(self, clip, video):
            super().paint(clip, video)
            if video == 0:
                clip[0, 0, 0, 0] = 3e38  # finite (the recognizers check), but overflows inside them

    cfg = _cfg(tmp_path, epochs=1, attackers="vit")
    train = BandLoader(num_videos=8, batch_videos=4, train=True)
    with pytest.warns(RuntimeWarning, match="raw: action, vit gave non-finite outputs"):
        result = evaluate_method(make_transform("raw"), cfg, train, OneNanVideo(num_videos=6, batch_videos=3,
                                                                                  train=False))
    assert math.isnan(result.top1) and math.isnan(result.cmap) and math.isnan(result.attackers["vit"]["cmap"])
    assert "outputs not finite (diverged in training; its scores are undefined, NaN): action, vit" in result.note
    lines = [json.loads(x) for x in (tmp_path / "eval" / "eval_metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["test"]["top1"] is None  # NaN is written as null


@pytest.mark.parametrize("setting", [dict(min_lr_ratio=-1.0), dict(min_lr_ratio=1.5), dict(weight_decay=-0.1),
                                     dict(warmup_epochs=-5.0), dict(warmup_epochs=math.inf), dict(clip_grad=-1.0),
                                     dict(base_lr=math.inf), dict(weight_decay=math.nan)],
                         ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_eval_settings_that_train_nonsense_are_refused(tmp_path, setting):
    """A negative min_lr_ratio turned the cosine's end into a negative lr (gradient ascent); the training config
    refused these, the evaluation's took them."""
    with pytest.raises(ValueError, match=next(iter(setting))):
        _cfg(tmp_path, **setting)


def test_evaluate_writes_tables_and_refuses_bad_method_lists_before_training(tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    train = BandLoader(num_videos=16, batch_videos=8, train=True)
    test = BandLoader(num_videos=10, batch_videos=5, train=False, views=2, seed=1)
    # Refused before any training (blacken without boxes was skipped with a warning, and a run of it alone ended
    # "successfully" with an empty table; a method named twice was trained twice; a keep ratio with no stprivacy
    # method was ignored).
    for methods, kw, match in [(("raw", "blacken"), {}, "'blacken' needs person boxes"),
                               (("raw", "downsample4", "raw"), {}, r"\['raw'\] named more than once"),
                               (("raw",), {"keep_ratio": 0.5}, "'stprivacy' is not among the methods")]:
        with pytest.raises(ValueError, match=match):
            evaluate(cfg, methods=methods, train_loader=train, test_loader=test, **kw)
    assert not (tmp_path / "eval").exists() or not list((tmp_path / "eval").iterdir())
    results = evaluate(cfg, methods=("raw", "downsample4"), train_loader=train, test_loader=test)
    assert [r.method for r in results] == ["raw", "downsample4"]
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "| raw |" in md and "| downsample4 |" in md
    assert "for orientation; different data" in md and "51.44" in md and "82.55" in md
    rows = list(csv.DictReader((tmp_path / "eval" / "results.csv").open()))
    assert [r["method"] for r in rows if r["source"] == "ours"] == ["raw", "downsample4"]
    assert {r["dataset"] for r in rows if r["source"] == "paper"} == {"hmdb51", "ucf101"}
    with pytest.raises(ValueError, match="checkpoint"):
        evaluate(cfg, methods=("stprivacy",), train_loader=train, test_loader=test)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(cfg, methods=("pixelate",), train_loader=train, test_loader=test)


def test_results_table_and_paper_block(tmp_path):
    nan = math.nan
    results = [
        MethodResult("raw", 51.0, 75.5, 0.67, {}, {}, [], 10, 8, 1.0, 1.0, 80),
        MethodResult("stprivacy@0.7", 50.2, nan, 0.6, {}, {}, ["nudity"], 10, 8, 0.343, 1.0, 80,
                     note="cMAP over 4 of 5 attributes"),
    ]
    md, table = results_table(results, dataset="ucf101")
    assert "| stprivacy@0.7 | 50.20 | .600 | n/a |" in md and "cMAP over 4 of 5" in md
    assert "VP-UCF101" in md and "VP-HMDB51" not in md and "84.20 / .684 / 76.62" in md
    rows = list(csv.DictReader(table.splitlines()))
    assert rows[1]["cmap"] == "" and rows[0]["top1"] == "51"
    assert [r["method"] for r in rows if r["source"] == "paper"] == [r["method"] for r in paper_table("ucf101")]
    assert paper_table("hmdb51")[2] == {"method": "STPrivacy", "top1": 50.73, "f1": 0.613, "cmap": 72.48}
    with pytest.raises(ValueError, match="dataset"):
        paper_table("kinetics")
    md_path, csv_path = write_results(results, tmp_path / "out", dataset="hmdb51")
    assert md_path.read_text().startswith("## Phase 3") and csv_path.read_text().startswith("source,")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.csv", "results.md"]  # no temp left


def test_sweep_writes_csv_and_plot(tmp_path):
    model, path = _tiny_checkpoint(tmp_path)
    cfg = _cfg(tmp_path, epochs=1, preset=None)
    train = BandLoader(num_videos=8, batch_videos=4, train=True)
    test = BandLoader(num_videos=6, batch_videos=3, train=False, views=2, seed=1)
    raw = SweepPoint("raw", math.nan, 1.0, 60.0, 70.0, 0.6)
    points = sweep(cfg, path, keep_ratios=(1.0, 0.5), thresholds=(0.5,), raw=raw, train_loader=train,
                   test_loader=test)
    assert [(p.setting, p.value) for p in points] == [("keep_ratio", 1.0), ("keep_ratio", 0.5), ("threshold", 0.5)]
    per_slot = model.cfg.tokens_per_slot
    assert points[0].kept_fraction == pytest.approx(1.0)
    assert points[1].kept_fraction == pytest.approx(model.cfg.kept_per_slot(0.5)[-1] / per_slot)
    # The adaptive point: the mean of the model's own keep masks at t = 0.5 over every test clip.
    with torch.no_grad():
        keep = torch.cat([model.eval()(b.clips, adaptive_threshold=0.5).keep for b in test])
    assert 0.0 < points[2].kept_fraction < 1.0
    assert points[2].kept_fraction == pytest.approx(keep.mean().item(), abs=1e-6)
    rows = list(csv.DictReader((tmp_path / "eval" / "sweep.csv").open()))
    assert [r["setting"] for r in rows] == ["keep_ratio", "keep_ratio", "threshold", "raw"]
    png = (tmp_path / "eval" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # write_sweep on its own, with a MethodResult as the raw point.
    raw_result = MethodResult("raw", 55.0, 71.0, 0.7, {}, {}, [], 6, 6, 1.0, 1.0, 1)
    csv_path, png_path = write_sweep(points, tmp_path / "alone", raw=raw_result)
    assert csv_path.read_text().count("\n") == 5 and png_path.stat().st_size > 5000


@pytest.mark.parametrize("run", ["evaluate_ratio", "evaluate_threshold", "evaluate_box", "sweep_ratio",
                                 "sweep_threshold"])
def test_bad_settings_fail_before_any_recognizer_trains(tmp_path, run):
    """A bad keep ratio, threshold or box is an error before the first method's recognizers train (they take
    hours at real sizes), not after the methods before it."""
    _, path = _tiny_checkpoint(tmp_path)
    cfg = _cfg(tmp_path, epochs=1, preset=None)
    loaders = dict(train_loader=BandLoader(num_videos=8, batch_videos=4, train=True),
                   test_loader=BandLoader(num_videos=4, batch_videos=2, train=False))
    call, match = {
        "evaluate_ratio": (lambda: evaluate(cfg, checkpoint=path, methods=("raw", "stprivacy"), keep_ratio=1.5,
                                            **loaders), "keep_ratio must be a real number in \\(0, 1\\] .*got 1.5"),
        "evaluate_threshold": (lambda: evaluate(cfg, checkpoint=path, methods=("raw", "stprivacy"), threshold=1.5,
                                                **loaders), "adaptive_threshold must be a real number in \\(0, 1\\)"),
        "evaluate_box": (lambda: evaluate(cfg, methods=("raw", "blacken"), boxes={"a/b": (0.6, 0.0, 0.4, 1.0)},
                                          **loaders), "x0 <= x1"),
        "sweep_ratio": (lambda: sweep(cfg, path, keep_ratios=(0.5, 2.0), thresholds=(), **loaders),
                        "keep_ratio must be a real number in \\(0, 1\\] .*got 2.0"),
        "sweep_threshold": (lambda: sweep(cfg, path, keep_ratios=(0.5,), thresholds=(0.0,), **loaders),
                            "adaptive_threshold must be"),
    }[run]
    with pytest.raises(ValueError, match=match):
        call()
    assert not (tmp_path / "eval").exists() or not list((tmp_path / "eval").iterdir())  # nothing trained


def test_geometry_mismatch_raises(tmp_path):
    _, path = _tiny_checkpoint(tmp_path)
    train = BandLoader(num_videos=8, batch_videos=4, train=True)
    test = BandLoader(num_videos=4, batch_videos=2, train=False)
    with pytest.raises(ValueError, match="geometry mismatch.*image_size=64"):
        sweep(_cfg(tmp_path, image_size=64, preset=None), path, keep_ratios=(0.7,), thresholds=(),
              train_loader=train, test_loader=test)
    with pytest.raises(ValueError, match="geometry mismatch.*num_frames=16"):
        evaluate(_cfg(tmp_path, num_frames=16), path, methods=("raw",), train_loader=train, test_loader=test)
    # Clips of another size than the evaluation expects: caught at the first batch, naming the shapes.
    with pytest.raises(ValueError, match=r"loader's clips are \(4, 3, 8, 32, 32\)"):
        evaluate_method(make_transform("raw"), _cfg(tmp_path, preset="vit_small"), train, test)
    # A recognizer preset whose tubelet grid cannot read STPrivacy's keep mask.
    with pytest.raises(ValueError, match="tubelet grid"):
        evaluate(_cfg(tmp_path, preset="vit_small", image_size=32, num_frames=8), path, methods=("stprivacy",),
                 train_loader=train, test_loader=test)


@pytest.mark.gpu
def test_sweep_on_cuda_bf16(tmp_path):
    # The CUDA path: bf16 autocast, STPrivacy and the recognizers on the GPU, Triton kernels by dispatch.
    model, path = _tiny_checkpoint(tmp_path)
    cfg = _cfg(tmp_path, epochs=2, preset=None, device="cuda")
    train = BandLoader(num_videos=16, batch_videos=8, train=True)
    test = BandLoader(num_videos=6, batch_videos=3, train=False, views=2, seed=1)
    points = sweep(cfg, path, keep_ratios=(0.7,), thresholds=(0.5,), train_loader=train, test_loader=test)
    assert points[0].kept_fraction == pytest.approx(model.cfg.kept_per_slot(0.7)[-1] / model.cfg.tokens_per_slot)
    for p in points:
        assert 0 <= p.top1 <= 100 and 0 <= p.cmap <= 100 and 0 <= p.f1 <= 1
    result = evaluate_method(make_transform("blacken", boxes={"class0/v0": (0.0, 0.0, 0.5, 0.5)}), cfg, train, test,
                             backbone=model.cfg)
    assert 0 <= result.top1 <= 100 and "no person box" in result.note


def test_resume_reads_back_only_results_of_the_same_recognizers_and_data(tmp_path, monkeypatch):
    """eval --resume keys each finished method by what it was computed from: the baselines' recognizers take the
    checkpoint's backbone, so a raw result made with checkpoint A is not read back for checkpoint B (another
    architecture); with A again it is. Paths in the config (an API user's) are fine in the key."""
    from pathlib import Path

    from stpcore.evaluation import MethodResult, protocol

    trained = []

    def fake_method(transform, cfg, train_loader, test_loader, backbone=None, device=None):
        trained.append((transform.name, backbone.depth))
        return MethodResult(transform.name, 50.0, float("nan"), 0.5, {}, {}, [], 3, 3, 1.0, 0.1, 1)

    monkeypatch.setattr(protocol, "evaluate_method", fake_method)
    monkeypatch.setattr(protocol, "default_loader", lambda cfg, train, backbone=None: BandLoader(
        num_videos=4, batch_videos=2, train=train))
    paths = {}
    for name, depth in (("a", 4), ("b", 5)):
        torch.manual_seed(0)
        config = STPrivacyConfig.from_name("tiny")
        config = type(config)(**{**config.__dict__, "depth": depth})
        paths[name] = save_anonymizer(STPrivacy(config), tmp_path / f"{name}.pt", classes=["x", "y", "z"])
    cfg = _cfg(tmp_path, out_dir=Path(tmp_path / "eval"), data_root=Path(tmp_path))
    for checkpoint, resume, want in (("a", False, [("raw", 4)]), ("a", True, []), ("b", True, [("raw", 5)]),
                                     ("a", True, [("raw", 4)])):
        trained.clear()
        results = protocol.evaluate(cfg, checkpoint=paths[checkpoint], methods=("raw",), resume=resume)
        assert trained == want and [r.method for r in results] == ["raw"], (checkpoint, resume)
    trained.clear()
    (read_back,) = protocol.evaluate(cfg, checkpoint=paths["a"], methods=("raw",), resume=True)
    assert trained == [] and math.isnan(read_back.cmap) and read_back.top1 == 50.0  # NaN survives the record


def test_resume_recomputes_results_made_from_another_init_file_decoder_or_version(tmp_path, monkeypatch):
    """eval --resume reads a result back only when it was made from the same inputs: the init_2d file's contents
    (not its path: a file replaced in place), the decoder that read the clips (cfg.decoder "auto" resolves to DALI
    or PyAV by machine) and stpcore's version (other attacker budgets, a fixed metric)."""
    import stpcore
    from stpcore.evaluation import MethodResult, protocol

    trained = []

    def fake_method(transform, cfg, train_loader, test_loader, backbone=None, device=None):
        trained.append(transform.name)
        return MethodResult(transform.name, 50.0, 40.0, 0.5, {}, {}, [], 3, 3, 1.0, 0.1, 1)

    decoder = {"name": "pyav"}

    class Loader(BandLoader):
        @property
        def decoder_name(self):
            return decoder["name"]

    monkeypatch.setattr(protocol, "evaluate_method", fake_method)
    monkeypatch.setattr(protocol, "default_loader", lambda cfg, train, backbone=None: Loader(
        num_videos=4, batch_videos=2, train=train))
    init = tmp_path / "vit_2d.pt"
    init.write_bytes(b"weights one")
    cfg = _cfg(tmp_path, init_2d=str(init))

    def trains() -> bool:
        trained.clear()
        protocol.evaluate(cfg, methods=("raw",), resume=True)
        return trained == ["raw"]

    assert trains() and not trains()  # made once, then read back
    init.write_bytes(b"weights two")  # the same path, other weights
    assert trains() and not trains()
    decoder["name"] = "dali"
    assert trains() and not trains()
    monkeypatch.setattr(stpcore, "__version__", "99.0")
    assert trains() and not trains()


def test_settings_that_cannot_work_fail_before_any_training(tmp_path, monkeypatch):
    """No method (or sweep point), a CUDA device on a machine without one, or an out_dir that cannot be a folder:
    a clear error before the first recognizer trains (the folder was made after the first method, an hour in)."""
    from stpcore.evaluation import protocol

    monkeypatch.setattr(protocol, "evaluate_method", lambda *a, **k: pytest.fail("trained before the check"))
    train = BandLoader(num_videos=4, batch_videos=2, train=True)
    test = BandLoader(num_videos=3, batch_videos=3, train=False, views=2, seed=1)
    with pytest.raises(ValueError, match="no method to evaluate"):
        protocol.evaluate(_cfg(tmp_path), methods=(), train_loader=train, test_loader=test)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        protocol.evaluate(_cfg(tmp_path, out_dir=str(tmp_path / "file" / "eval")), methods=("raw",),
                          train_loader=train, test_loader=test)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            protocol.evaluate(_cfg(tmp_path, device="cuda"), methods=("raw",), train_loader=train, test_loader=test)
    torch.manual_seed(0)
    path = save_anonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")), tmp_path / "m.pt", classes=["x", "y", "z"])
    with pytest.raises(ValueError, match="no point to sweep"):
        protocol.sweep(_cfg(tmp_path), path, keep_ratios=(), thresholds=(), train_loader=train, test_loader=test)


def test_a_video_replaced_in_place_is_another_video_in_a_results_key(tmp_path):
    from types import SimpleNamespace

    from stpcore.evaluation.protocol import videos_of

    video = tmp_path / "v.webm"
    video.write_bytes(b"one")
    loader = SimpleNamespace(records=[SimpleNamespace(video_id="c/v", path=video)])
    before = videos_of(train=loader)
    os.utime(video, ns=(0, video.stat().st_mtime_ns + 10**9))
    assert videos_of(train=loader) != before and videos_of(train=loader)["train"][0][0] == "c/v"


def test_blacken_maps_a_frame_box_through_crop_and_flip():
    """A box on the whole frame, a clip cut from its left two thirds and mirrored: the box lands mirrored, shifted
    and scaled in the clip (views (y0, x0, h, w, flip) relative to the frame)."""
    clips = torch.ones(2, 3, 2, 30, 30)
    box = {"a/v": (0.5, 0.0, 0.6, 1.0)}  # x from half to six tenths of the frame, full height
    views = torch.tensor([[0.0, 0.0, 1.0, 2 / 3, 0.0], [0.0, 0.0, 1.0, 2 / 3, 1.0]])
    video, _ = make_transform("blacken", boxes=box)(clips, ["a/v", "a/v"], views=views)
    zero = (video[:, 0, 0] == 0).all(dim=1)  # (B, W): columns blackened
    # Frame x 0.5-0.6 is clip x 0.75-0.9 (columns 22.5-27 -> 22..26); mirrored: 0.1-0.25 (3..7).
    assert zero[0].nonzero().flatten().tolist() == list(range(22, 27))
    assert zero[1].nonzero().flatten().tolist() == list(range(3, 8))


@pytest.mark.parametrize("train", [True, False], ids=["train-flips", "test-crops"])
def test_blacken_hides_the_person_in_every_view_the_loader_cuts(tmp_path, train):
    """The review's case: a box given on the frame was applied to every clip as if the clip were the frame, so a
    mirrored training clip showed the person whole, and the left test crop most of it. Through the PyAV loader's
    own crops and flips, no pixel of the person is left."""
    pytest.importorskip("av")  # PyAV writes and decodes the videos
    from stpcore.data import DataConfig, get_loader
    from stpcore.data.synth import write_video
    from stpcore.media import IMAGENET_MEAN, IMAGENET_STD

    frames = np.full((40, 120, 176, 3), 90, np.uint8)
    frames[:, 30:90, 110:150] = 255  # the person: x 110-150 of 176, y 30-90 of 120
    (tmp_path / "ds" / "walk").mkdir(parents=True)
    for i in range(4):
        write_video(tmp_path / "ds" / "walk" / f"v{i}.avi", frames, codec="mpeg4")
    (tmp_path / "ds" / "walk_test_split1.txt").write_text("".join(f"v{i}.avi {1 if i < 2 else 2}\n" for i in range(4)))
    loader = get_loader(DataConfig(root=str(tmp_path / "ds"), train=train, batch_size=2, workers=0, decoder="pyav",
                                   crop=64, num_frames=8))
    boxes = {f"walk/v{i}": (110 / 176, 30 / 120, 150 / 176, 90 / 120) for i in range(4)}
    blacken = make_transform("blacken", boxes=boxes)
    flips = 0
    for epoch in range(4 if train else 1):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.views is not None and batch.views.shape == (len(batch), 5)
            flips += int(batch.views[:, 4].sum())
            video, _ = blacken(batch.clips, batch.video_ids, views=batch.views)
            pixels = video * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) * 255 \
                + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1) * 255
            assert (pixels > 200).sum() == 0, batch.views
            if not train:
                assert (batch.clips * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) * 255
                        + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1) * 255 > 200).any()  # the person was there
    assert flips > 0 or not train


def test_vit_small_recognizers_from_random_weights_are_said_to_be(tmp_path):
    """The paper's phase-3 ViT-S starts from ImageNet weights; `stpcore eval` without --init-2d trained it from
    scratch and printed the result beside the paper's table without a word."""
    from stpcore.models import BackboneConfig

    backbone = BackboneConfig(num_frames=T, image_size=S, tubelet=(2, 16, 16), embed_dim=384, depth=1, num_heads=6)
    cfg = _cfg(tmp_path, preset=None, epochs=1, attackers="vit")
    train = BandLoader(num_videos=8, batch_videos=4, train=True)
    test = BandLoader(num_videos=3, batch_videos=3, train=False, views=2, seed=1)
    with pytest.warns(RuntimeWarning, match="from random weights.*--init-2d"):
        result = evaluate_method(make_transform("raw"), cfg, train, test, backbone=backbone)
    assert "recognizers from random weights" in result.note
    tiny = evaluate_method(make_transform("raw"), _cfg(tmp_path, epochs=1, attackers="vit"), train, test)  # no word
    assert "random weights" not in tiny.note
