from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stpcore.models import (
    RecognizerConfig,
    STPrivacy,
    STPrivacyConfig,
    VideoRecognizer,
    inflate_2d_vit,
    load_inflated_2d_vit,
    load_official_state_dict,
)
from tests.models import official_keys

CFG = STPrivacyConfig.from_name("tiny")  # D=48, depth 4, tubelet (2, 8, 8), grid (4, 4, 4)


def _outputs(model: STPrivacy, video: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(video)


def test_stpcore_checkpoint_round_trip(tmp_path):
    """stpcore's own state dict (phase-1 head included) goes through the same loader unchanged."""
    source = STPrivacy(CFG)
    # DataParallel-style names inside a {"model": ...} wrapper, written and read as a file.
    saved = {"model": {f"module.{k}": v.clone() for k, v in source.state_dict().items()}, "epoch": torch.tensor(3)}
    path = tmp_path / "stprivacy.pth"
    torch.save(saved, path)
    target = STPrivacy(CFG)
    video = torch.randn(2, 3, CFG.num_frames, CFG.image_size, CFG.image_size)
    assert not torch.equal(_outputs(target, video).video, _outputs(source, video).video)
    report = target.load_official_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    assert report.missing == [] and report.unexpected == [] and report.not_in_release == []
    a, b = _outputs(source, video), _outputs(target, video)
    assert torch.equal(a.video, b.video) and torch.equal(a.action_logits, b.action_logits)
    assert all(torch.equal(x, y) for x, y in zip(a.decisions, b.decisions, strict=True))


# -- weights with the release's own key names and shapes (tests/models/official_keys.py) ----------------

# stpcore's phase-1 action head on STPrivacy; the release's STPrivacy has no classifier.
STPRIVACY_ONLY = ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def _random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}


@pytest.fixture(scope="module")
def release_stprivacy() -> dict[str, torch.Tensor]:
    return _random_state_dict(official_keys.stprivacy_vit_small())


def test_release_key_listing_is_complete():
    assert len(official_keys.stprivacy_vit_small()) == 181
    assert len(official_keys.recognizer_vit_small(51)) == 151


@pytest.mark.parametrize("wrap", ["plain", "model-module", "state_dict"])
def test_release_stprivacy_state_dict_loads(release_stprivacy, wrap):
    model = STPrivacy(STPrivacyConfig.from_name("vit_small"))
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k in STPRIVACY_ONLY}
    if wrap == "model-module":
        checkpoint = {"model": {f"module.{k}": v for k, v in release_stprivacy.items()}, "epoch": torch.tensor(80)}
    elif wrap == "state_dict":
        checkpoint = {"state_dict": release_stprivacy}
    else:
        checkpoint = release_stprivacy
    report = model.load_official_state_dict(checkpoint)
    assert report.missing == [] and report.unexpected == []
    assert report.not_in_release == STPRIVACY_ONLY
    own = model.state_dict()
    # Every stpcore key is a release key or reported: a renamed parameter fails here.
    assert set(own) == set(release_stprivacy) | set(report.not_in_release)
    assert set(release_stprivacy).isdisjoint(report.not_in_release)
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.bias", "blocks.11.mlp.fc2.weight",
                "score_predictor.2.out_conv.4.bias", "norm_recon.weight", "head_recon.weight"):
        assert torch.equal(own[key], release_stprivacy[key]), key
    assert all(torch.equal(own[k], release_stprivacy[k]) for k in release_stprivacy)
    assert torch.equal(model.score_predictor[1].in_conv[1].weight.detach(),
                       release_stprivacy["score_predictor.1.in_conv.1.weight"])
    # The phase-1 head keeps its usual initialisation (LayerNorm ones / zeros, zero bias).
    assert all(torch.equal(own[k], head_before[k]) for k in STPRIVACY_ONLY)
    assert torch.equal(model.fc_norm.weight.detach(), torch.ones(384)) and not model.head.bias.detach().any()


@pytest.mark.parametrize("num_outputs", [51, 5], ids=["action-hmdb51", "privacy-5"])
def test_release_recognizer_state_dict_loads(num_outputs):
    released = _random_state_dict(official_keys.recognizer_vit_small(num_outputs), seed=num_outputs)
    model = VideoRecognizer(RecognizerConfig.from_name("vit_small", num_outputs=num_outputs))
    report = model.load_official_state_dict({"model": {f"module.{k}": v for k, v in released.items()}})
    assert report.missing == [] and report.unexpected == [] and report.not_in_release == []
    own = model.state_dict()
    assert set(own) == set(released)
    assert all(torch.equal(own[k], released[k]) for k in released)
    assert torch.equal(model.head_new.weight.detach(), released["head_new.weight"])
    assert torch.equal(model.blocks[7].attn.proj.weight.detach(), released["blocks.7.attn.proj.weight"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop score_predictor.1.out_conv.2.weight",
         r"1 missing key\(s\) \[score_predictor\.1\.out_conv\.2\.weight\], 0 unexpected"),
        ("drop head_recon.bias", r"1 missing key\(s\) \[head_recon\.bias\]"),
        ("add cls_token", r"0 missing key\(s\) \[\], 1 unexpected key\(s\) \[cls_token\]"),
        ("reshape pos_embed", r"1 shape mismatch.*pos_embed: checkpoint \(1, 393, 384\) vs model \(1, 392, 384\)"),
        ("reshape head_recon.weight", r"head_recon\.weight: checkpoint \(768, 384\) vs model \(1536, 384\)"),
    ],
    ids=["missing-predictor", "missing-recon", "extra-key", "shape-pos-embed", "shape-recon"],
)
def test_release_stprivacy_state_dict_errors(release_stprivacy, edit, message):
    sd = dict(release_stprivacy)
    verb, key = edit.split()
    if verb == "drop":
        del sd[key]
    elif verb == "add":
        sd[key] = torch.zeros(1, 1, 384)
    else:
        sd[key] = torch.zeros((1, 393, 384) if key == "pos_embed" else (768, 384))
    model = STPrivacy(STPrivacyConfig.from_name("vit_small"))
    before = model.pos_embed.detach().clone()
    with pytest.raises(ValueError, match=message):
        model.load_official_state_dict(sd)
    assert torch.equal(model.pos_embed.detach(), before), "a failed load leaves the model untouched"


def test_release_stprivacy_partial_load_reports_missing(release_stprivacy):
    sd = {k: v for k, v in release_stprivacy.items() if not k.startswith("score_predictor.2.")}
    model = STPrivacy(STPrivacyConfig.from_name("vit_small"))
    report = load_official_state_dict(model, sd, strict=False)
    assert report.missing == sorted(k for k in release_stprivacy if k.startswith("score_predictor.2."))
    assert report.unexpected == [] and report.not_in_release == STPRIVACY_ONLY
    assert torch.equal(model.pos_embed.detach(), release_stprivacy["pos_embed"])


def test_release_recognizer_wrong_head_size_fails():
    released = _random_state_dict(official_keys.recognizer_vit_small(51))
    model = VideoRecognizer(RecognizerConfig.from_name("vit_small", num_outputs=5))
    with pytest.raises(ValueError, match=r"head_new\.weight: checkpoint \(51, 384\) vs model \(5, 384\)"):
        model.load_official_state_dict(released)


def test_wrong_key_set_is_reported():
    model = STPrivacy(CFG)
    sd = dict(model.state_dict())
    del sd["head_recon.bias"]
    sd["decoder.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \[head_recon.bias\].*1 unexpected key\(s\) \[decoder"):
        load_official_state_dict(model, sd)
    report = load_official_state_dict(model, sd, strict=False)
    assert report.missing == ["head_recon.bias"] and report.unexpected == ["decoder.weight"]


def test_stpcore_checkpoint_with_part_of_the_head_is_incomplete():
    """A state dict holding some of STPrivacy's stpcore-only keys is stpcore's own: it needs all of them."""
    model = STPrivacy(CFG)
    sd = dict(model.state_dict())
    del sd["head.bias"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \[head\.bias\], 0 unexpected"):
        load_official_state_dict(model, sd)
    report = load_official_state_dict(model, sd, strict=False)
    assert report.missing == ["head.bias"] and report.not_in_release == []


def test_shape_mismatch_is_reported():
    model = STPrivacy(CFG)
    sd = dict(model.state_dict())
    sd["pos_embed"] = torch.zeros(1, 392, CFG.embed_dim)
    before = model.pos_embed.detach().clone()
    with pytest.raises(ValueError, match="pos_embed"):
        load_official_state_dict(model, sd, strict=False)
    assert torch.equal(model.pos_embed.detach(), before)


def _timm_vit(image_size: int, patch: int = 8, dim: int = 48, depth: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of a timm/DeiT ViT state dict."""
    g = image_size // patch
    sd = {
        "cls_token": torch.randn(1, 1, dim),
        "pos_embed": torch.randn(1, 1 + g * g, dim),
        "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch),
        "patch_embed.proj.bias": torch.randn(dim),
        "norm.weight": torch.randn(dim),
        "norm.bias": torch.randn(dim),
        "head.weight": torch.randn(1000, dim),
        "head.bias": torch.randn(1000),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": torch.randn(dim), p + "norm1.bias": torch.randn(dim),
            p + "attn.qkv.weight": torch.randn(3 * dim, dim), p + "attn.qkv.bias": torch.randn(3 * dim),
            p + "attn.proj.weight": torch.randn(dim, dim), p + "attn.proj.bias": torch.randn(dim),
            p + "norm2.weight": torch.randn(dim), p + "norm2.bias": torch.randn(dim),
            p + "mlp.fc1.weight": torch.randn(4 * dim, dim), p + "mlp.fc1.bias": torch.randn(4 * dim),
            p + "mlp.fc2.weight": torch.randn(dim, 4 * dim), p + "mlp.fc2.bias": torch.randn(dim),
        })
    return sd


def test_inflation_shapes_and_positional_embedding():
    vit = _timm_vit(image_size=56)  # 7 x 7 grid + CLS, resized to the tiny model's 4 x 4
    out = inflate_2d_vit(vit, CFG)
    assert out["patch_embed.proj.weight"].shape == (48, 3, 2, 8, 8)
    assert out["pos_embed"].shape == (1, CFG.num_tokens, 48)
    assert not any(k.startswith(("cls_token", "head", "norm.")) for k in out)
    model = STPrivacy(CFG)
    own = model.state_dict()
    assert all(out[k].shape == own[k].shape for k in out)
    pos = out["pos_embed"].reshape(CFG.num_slots, CFG.tokens_per_slot, 48)
    assert all(torch.equal(pos[0], pos[s]) for s in range(1, CFG.num_slots)), "same spatial table in every slot"
    expected = F.interpolate(vit["pos_embed"][:, 1:].reshape(1, 7, 7, 48).permute(0, 3, 1, 2), size=(4, 4),
                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(16, 48)
    torch.testing.assert_close(pos[0], expected)
    # Same grid size: no resampling, the table is copied exactly (CLS entry dropped).
    vit32 = _timm_vit(image_size=32)
    same = inflate_2d_vit(vit32, CFG)["pos_embed"]
    assert torch.equal(same[0, : CFG.tokens_per_slot], vit32["pos_embed"][0, 1:])


def test_inflated_patch_embedding_equals_2d_conv_on_constant_clips(tmp_path):
    vit = _timm_vit(image_size=32)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": vit}, path)
    model = STPrivacy(CFG)
    report = load_inflated_2d_vit(model, path)
    assert report.unexpected == []
    assert report.missing and all(k.startswith(("score_predictor", "norm_recon", "head_recon", "fc_norm", "head."))
                                  for k in report.missing)
    assert torch.equal(model.blocks[2].attn.qkv.weight.detach(), vit["blocks.2.attn.qkv.weight"])
    frames = torch.randn(2, 3, CFG.num_slots, CFG.image_size, CFG.image_size)  # one frame per slot
    video = frames.repeat_interleave(CFG.tubelet[0], dim=2)  # constant within each tubelet
    with torch.no_grad():
        tokens = model.patch_embed(video)  # (B, N, D), t-major
        for s in range(CFG.num_slots):
            conv2d = F.conv2d(frames[:, :, s], vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=8)
            expected = conv2d.flatten(2).transpose(1, 2)  # (B, 16, D)
            torch.testing.assert_close(tokens[:, s * 16 : (s + 1) * 16], expected, atol=1e-4, rtol=1e-5)


def test_inflation_rejects_mismatched_vits(tmp_path):
    with pytest.raises(ValueError, match="depth"):
        inflate_2d_vit(_timm_vit(image_size=32, depth=3), CFG)
    with pytest.raises(ValueError, match="patch_embed"):
        inflate_2d_vit(_timm_vit(image_size=32, patch=16), CFG)
    bad = _timm_vit(image_size=32)
    bad["pos_embed"] = torch.randn(1, 1 + 14, 48)  # neither 15 nor 14 entries form a square grid
    with pytest.raises(ValueError, match="pos_embed"):
        inflate_2d_vit(bad, CFG)
    torch.save({"state_dict": {"module." + k: v for k, v in _timm_vit(32, dim=96).items()}}, tmp_path / "big.pth")
    with pytest.raises(ValueError, match="patch_embed"):
        load_inflated_2d_vit(STPrivacy(CFG), tmp_path / "big.pth")


@pytest.mark.parametrize("damage", ["missing weights", "unknown config field", "weights of another size",
                                    "a truncated state dict"])
def test_a_damaged_or_other_version_checkpoint_is_one_clear_error(tmp_path, damage):
    """A file of the right kind that this version cannot load used to end in a KeyError, TypeError or RuntimeError
    traceback; now one ValueError naming the file and what to do."""
    from stpcore.models import STPrivacy, STPrivacyConfig, load_anonymizer, save_anonymizer

    path = save_anonymizer(STPrivacy(STPrivacyConfig.from_name("tiny")), tmp_path / "m.pt", classes=["a"])
    state = torch.load(path, weights_only=True)
    if damage == "missing weights":
        del state["state_dict"]
    elif damage == "unknown config field":
        state["model_config"]["a_field_from_the_future"] = 1
    elif damage == "weights of another size":
        state["model_config"]["embed_dim"] *= 2
    else:
        del state["state_dict"]["pos_embed"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"m\.pt: an stpcore checkpoint \(.+\) that this version cannot load: .+; "
                                         r"was it written by another stpcore version, or damaged\?") as caught:
        load_anonymizer(path)
    if damage == "a truncated state dict":  # the message names what is missing, not only "Error(s) in loading"
        assert 'Missing key(s) in state_dict: "pos_embed"' in str(caught.value)
