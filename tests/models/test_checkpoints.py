from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stpcore.models import (
    RecognizerConfig,
    STPrivacy,
    VideoRecognizer,
    from_name,
    inflate_2d_vit,
    load_inflated_2d_vit,
    load_official_state_dict,
)

CFG = from_name("tiny")  # D=48, depth 4, tubelet (2, 8, 8), grid (4, 4, 4)


def _outputs(model: STPrivacy, video: torch.Tensor):
    model.eval()
    with torch.no_grad():
        return model(video)


def test_release_state_dict_loads_unchanged(tmp_path):
    source = STPrivacy(CFG)
    # DataParallel-style names inside a {"model": ...} wrapper, written and read as a file.
    released = {"model": {f"module.{k}": v.clone() for k, v in source.state_dict().items()}, "epoch": torch.tensor(3)}
    path = tmp_path / "stprivacy.pth"
    torch.save(released, path)
    target = STPrivacy(CFG)
    video = torch.randn(2, 3, CFG.num_frames, CFG.image_size, CFG.image_size)
    assert not torch.equal(_outputs(target, video).video, _outputs(source, video).video)
    report = target.load_official_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    assert report.missing == [] and report.unexpected == []
    a, b = _outputs(source, video), _outputs(target, video)
    assert torch.equal(a.video, b.video) and torch.equal(a.action_logits, b.action_logits)
    assert all(torch.equal(x, y) for x, y in zip(a.decisions, b.decisions, strict=True))


def test_release_names_are_the_documented_ones():
    keys = set(STPrivacy(CFG).state_dict())
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.norm1.weight", "blocks.3.attn.qkv.bias",
                "blocks.3.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
                "score_predictor.2.in_conv.0.weight", "score_predictor.2.in_conv.1.weight",
                "score_predictor.0.out_conv.0.weight", "score_predictor.0.out_conv.2.weight",
                "score_predictor.0.out_conv.4.bias", "norm_recon.weight", "head_recon.weight", "fc_norm.weight",
                "head.weight"):
        assert key in keys, key
    rec = set(VideoRecognizer(RecognizerConfig.from_name("tiny")).state_dict())
    assert {"fc_norm.weight", "head_new.weight", "head_new.bias", "pos_embed"} <= rec


def test_wrong_key_set_is_reported():
    model = STPrivacy(CFG)
    sd = dict(model.state_dict())
    del sd["head_recon.bias"]
    sd["decoder.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \[head_recon.bias\].*1 unexpected key\(s\) \[decoder"):
        load_official_state_dict(model, sd)
    report = load_official_state_dict(model, sd, strict=False)
    assert report.missing == ["head_recon.bias"] and report.unexpected == ["decoder.weight"]


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
