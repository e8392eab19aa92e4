from __future__ import annotations

import pytest
import torch

from stpcore.inference import (
    PRECISIONS,
    AnonymizedClips,
    ClipAnonymizer,
    cpu_has_native_bf16,
    int8_unavailable_reason,
    load_trained,
)
from stpcore.models import STPrivacy, from_name
from stpcore.tubelets import keep_to_pixels

CFG = from_name("tiny")  # 8 x 32 x 32 clips, 4 slots x 16 tokens, kept per slot 11, 7, 5
B = 4
VARIANTS = ["fp32", "bf16", "auto"] + ([] if int8_unavailable_reason() else ["int8"])
LOW_PRECISION = [p for p in VARIANTS if p in ("bf16", "int8")]


def _separated(model: STPrivacy, scale: float = 10.0) -> STPrivacy:
    # As in tests/models/test_stprivacy.py: unit-gain predictor weights and a scaled last Linear, so the
    # keep logits are far apart and low-precision rounding rarely reorders them (the stand-in for trained
    # weights). scale 10 rather than 100: at 100 most kept tokens' log-probs round to exactly 0.0 in fp32,
    # and the top-k among those ties would measure tie-breaking, not precision.
    with torch.no_grad():
        for pred in model.score_predictor:
            for layer in (pred.in_conv[1], pred.out_conv[0], pred.out_conv[2], pred.out_conv[4]):
                torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                layer.bias.zero_()
            pred.out_conv[4].weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def model() -> STPrivacy:
    torch.manual_seed(1)
    return _separated(STPrivacy(from_name("tiny")))


@pytest.fixture
def clips() -> torch.Tensor:
    return torch.randn(B, 3, CFG.num_frames, CFG.image_size, CFG.image_size)


def _pixel_mask(keep: torch.Tensor, cfg=CFG) -> torch.Tensor:
    return keep_to_pixels(keep, cfg.grid, cfg.tubelet).expand(-1, 3, -1, -1, -1).bool()  # (B, 3, T, H, W)


def _check_structure(out: AnonymizedClips, cfg, batch: int, per_slot: int) -> None:
    assert isinstance(out, AnonymizedClips)
    assert out.video.shape == (batch, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    assert out.video.dtype == torch.float32 and out.keep.dtype == torch.float32
    assert out.keep.shape == (batch, cfg.num_tokens)
    assert bool(((out.keep == 0) | (out.keep == 1)).all())
    counts = out.keep.reshape(batch, cfg.num_slots, cfg.tokens_per_slot).sum(-1)
    assert bool((counts == per_slot).all()), counts
    assert out.kept_positions is not None and out.kept_positions.shape == (batch, cfg.num_slots * per_slot)
    assert bool((out.keep.gather(1, out.kept_positions) == 1).all())
    mask = _pixel_mask(out.keep, cfg)
    assert torch.equal(out.video[~mask], torch.zeros_like(out.video[~mask])), "dropped tubelets must be exactly zero"
    assert bool(torch.isfinite(out.video).all()) and bool((out.video[mask] != 0).any())


@pytest.mark.parametrize("precision", VARIANTS)
def test_every_variant_shapes_counts_and_zeros(model, clips, precision):
    anon = ClipAnonymizer(model, precision=precision)
    assert anon.precision in PRECISIONS and anon.precision != "auto"
    _check_structure(anon(clips), CFG, B, CFG.kept_per_slot()[-1])
    # A deployment keep ratio changes the per-slot counts without retraining.
    _check_structure(anon(clips, keep_ratio=0.5), CFG, B, CFG.kept_per_slot(0.5)[-1])


def test_auto_on_cpu_is_int8_where_available(model):
    expected = "bf16" if cpu_has_native_bf16() else "fp32" if int8_unavailable_reason() else "int8"
    assert ClipAnonymizer(model).precision == expected


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, None)])
def test_auto_on_cpu_prefers_native_bf16(model, monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert cpu_has_native_bf16() is (expected == "bf16")
    fallback = "fp32" if int8_unavailable_reason() else "int8"
    assert ClipAnonymizer(model).precision == (expected or fallback)


def test_fp32_equals_the_plain_model_exactly(model, clips):
    anon = ClipAnonymizer(model, precision="fp32")
    plain = model.eval()
    with torch.no_grad():
        for kwargs in ({}, {"keep_ratio": 0.5}, {"adaptive_threshold": 0.5}):
            ref, out = plain(clips, **kwargs), anon(clips, **kwargs)
            assert torch.equal(out.video, ref.video), kwargs
            assert torch.equal(out.keep, ref.keep), kwargs
    assert torch.equal(anon(clips).kept_positions, plain(clips).kept_positions)


@pytest.mark.parametrize("precision", LOW_PRECISION)
@pytest.mark.parametrize("mode", ["topk", "adaptive"])
def test_low_precision_agrees_with_fp32(model, precision, mode):
    clips = torch.randn(8, 3, CFG.num_frames, CFG.image_size, CFG.image_size)
    kwargs = {"adaptive_threshold": 0.5} if mode == "adaptive" else {}
    ref = ClipAnonymizer(model, precision="fp32")(clips, **kwargs)
    out = ClipAnonymizer(model, precision=precision)(clips, **kwargs)
    agreement = (out.keep == ref.keep).float().mean().item()
    assert agreement >= 0.98, f"{precision} {mode}: keep agreement {agreement:.4f} < 0.98"
    # Not trivial: some tokens are dropped and some kept.
    assert 0 < int(ref.keep.sum()) < ref.keep.numel()
    # On tubelets both keep, the pixels are close. Measured here: relative RMS ~0.004 (bf16) and ~0.002
    # (int8), max abs error ~0.003 with outputs up to ~0.6; bounds 5x / 15x above that.
    both = _pixel_mask(out.keep * ref.keep)
    diff, expected = out.video[both] - ref.video[both], ref.video[both]
    rel_rms = (diff.pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()
    assert rel_rms < 0.02, f"{precision} {mode}: relative RMS {rel_rms:.3g}"
    assert diff.abs().max().item() < 0.05
    # Zeros are exact wherever this variant dropped a tubelet.
    dropped = ~_pixel_mask(out.keep)
    assert torch.equal(out.video[dropped], torch.zeros_like(out.video[dropped]))


@pytest.mark.parametrize("precision", VARIANTS)
def test_the_model_passed_in_is_not_modified(precision):
    model = STPrivacy(CFG).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    anon = ClipAnonymizer(model, precision=precision)
    anon(torch.randn(1, 3, CFG.num_frames, CFG.image_size, CFG.image_size))
    assert model.training, "the caller's model must stay in train mode"
    assert [type(m) for m in model.modules()] == types, "modules were swapped in the caller's model"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert all(p.requires_grad for p in model.parameters())
    assert anon.model is not model


def test_bad_arguments_raise(model, clips):
    with pytest.raises(ValueError, match=r"precision must be one of .*'auto'.*'fp32'.*'bf16'.*'int8'.*'fp16'"):
        ClipAnonymizer(model, precision="fp16")
    with pytest.raises(ValueError, match="CPU only"):
        ClipAnonymizer(model, device="cuda", precision="int8")  # refused before anything touches CUDA
    with pytest.raises(ValueError, match="threads"):
        ClipAnonymizer(model, precision="fp32", threads=0)
    with pytest.raises(ValueError, match="STPrivacy"):
        ClipAnonymizer(torch.nn.Linear(2, 2))
    anon = ClipAnonymizer(model, precision="fp32")
    with pytest.raises(ValueError, match="float"):
        anon(clips.to(torch.uint8))
    with pytest.raises(ValueError, match="cannot be combined"):
        anon(clips, keep_ratio=0.5, adaptive_threshold=0.5)


def test_threads_and_description(model):
    old = torch.get_num_threads()
    try:
        anon = ClipAnonymizer(model, precision="fp32", threads=1)
        assert torch.get_num_threads() == 1
        assert anon.description == "cpu, fp32, 1 threads"
        assert "bf16 autocast" in ClipAnonymizer(model, precision="bf16").description
    finally:
        torch.set_num_threads(old)


def test_load_trained_round_trip(model, clips, tmp_path):
    from stpcore.train import save_anonymizer

    path = save_anonymizer(model, tmp_path / "stprivacy.pt")
    anon = load_trained(path, precision="fp32")
    ref = ClipAnonymizer(model, precision="fp32")(clips)
    out = anon(clips)
    assert torch.equal(out.video, ref.video) and torch.equal(out.keep, ref.keep)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_vit_small_single_clip(precision):
    cfg = from_name("vit_small")
    model = _separated(STPrivacy(cfg))
    clip = torch.randn(1, 3, cfg.num_frames, cfg.image_size, cfg.image_size)
    out = ClipAnonymizer(model, precision=precision)(clip)
    _check_structure(out, cfg, 1, 16)  # 8 slots x 16 = 128 of 392 tokens
    if precision == "auto":
        # A sanity bound only: one clip has 392 decisions, so each flip costs 0.26%; the 98% bar is measured
        # at B=8 in benchmarks/bench_inference.py.
        ref = ClipAnonymizer(model, precision="fp32")(clip)
        assert (out.keep == ref.keep).float().mean().item() >= 0.95


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        ClipAnonymizer(STPrivacy(from_name("tiny")), device="cuda")
