from __future__ import annotations

import pytest

from stpcore.models import RecognizerConfig, STPrivacy, STPrivacyConfig


def test_vit_small_matches_the_paper():
    cfg = STPrivacyConfig.from_name("vit_small")
    assert (cfg.num_slots, cfg.tokens_per_slot, cfg.num_tokens) == (8, 49, 392)
    assert cfg.grid == (8, 7, 7)
    assert cfg.tubelet_dim == 1536
    assert cfg.kept_per_slot() == (34, 24, 16)
    model = STPrivacy(cfg)  # built once, no forward
    backbone_names = ("patch_embed", "pos_embed", "blocks")
    backbone = sum(p.numel() for n, p in model.named_parameters() if n.startswith(backbone_names))
    total = sum(p.numel() for p in model.parameters())
    # ViT-S/16's 12 blocks hold 21.3M parameters; the Conv3d patch kernel (2 frames) adds 0.59M and the
    # 392 positional entries 0.15M: about 22.0M (ViT-S/16 itself is 22.05M with its 1000-way head).
    assert 21.8e6 < backbone < 22.3e6, backbone
    # + 3 predictors (~0.24M each), the 1536-wide reconstruction head and the 51-way action head.
    assert 22.5e6 < total < 24.0e6, total
    assert model.pos_embed.shape == (1, 392, 384)
    assert len(model.blocks[model.cfg.prune_locations[-1]:]) == 3  # the anonymization blocks after the last prune


def test_tiny_and_overrides():
    cfg = STPrivacyConfig.from_name("tiny", keep_ratio=0.5, prune_locations=[1, 3])
    assert (cfg.num_slots, cfg.tokens_per_slot, cfg.num_tokens) == (4, 16, 64)
    assert cfg.prune_locations == (1, 3) and cfg.kept_per_slot() == (8, 4)
    assert hash(cfg)  # lists are stored as tuples: still hashable
    base = STPrivacyConfig.from_name("vit_base")
    assert base.embed_dim == 768 and base.num_heads == 12
    rec = RecognizerConfig.from_name("vit_small", num_outputs=5)
    assert rec.num_outputs == 5 and rec.num_tokens == 392


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"embed_dim": 50}, "embed_dim", id="embed-not-divisible-by-heads"),
        pytest.param({"embed_dim": 40}, "embed_dim", id="embed-not-divisible-by-12"),
        pytest.param({"prune_locations": (2, 1)}, "prune_locations", id="locations-decreasing"),
        pytest.param({"prune_locations": (1, 1)}, "prune_locations", id="locations-repeated"),
        pytest.param({"prune_locations": (1, 2, 4)}, "prune_locations", id="location-past-depth"),
        pytest.param({"keep_ratio": 0.0}, "keep_ratio", id="keep-ratio-0"),
        pytest.param({"keep_ratio": 1.5}, "keep_ratio", id="keep-ratio-1.5"),
        pytest.param({"num_frames": 7}, "num_frames", id="frames-not-divisible"),
        pytest.param({"image_size": 30}, "image_size", id="size-not-divisible"),
        pytest.param({"tau": 0.0}, "tau", id="tau-0"),
        pytest.param({"tubelet": (2, 8)}, "tubelet", id="tubelet-2d"),
        pytest.param({"nonsense": 1}, "nonsense", id="unknown-field"),
        # JSON config files: a value of another type named no field ("invalid literal for int()"), or ("4") passed
        pytest.param({"depth": "x"}, "field 'depth' must be an integer", id="depth-text"),
        pytest.param({"depth": "4"}, "field 'depth' must be an integer", id="depth-digit-text"),
        pytest.param({"binary_output": 1}, "field 'binary_output' must be true or false", id="flag-number"),
        pytest.param({"tubelet": [2, "8", 8]}, "field 'tubelet' must be a list of integers", id="tubelet-text"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        STPrivacyConfig.from_name("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="vit_huge"):
        STPrivacyConfig.from_name("vit_huge")
    with pytest.raises(ValueError, match="num_outputs"):
        RecognizerConfig.from_name("tiny", num_outputs=0)
