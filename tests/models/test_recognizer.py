from __future__ import annotations

import pytest
import torch

from stpcore.models import RecognizerConfig, VideoRecognizer
from stpcore.testing import assert_close

CFG = RecognizerConfig.from_name("tiny", num_outputs=5)
B, N = 3, CFG.num_tokens


@pytest.fixture
def model() -> VideoRecognizer:
    return VideoRecognizer(CFG).eval()


@pytest.fixture
def video() -> torch.Tensor:
    return torch.randn(B, 3, CFG.num_frames, CFG.image_size, CFG.image_size)


def _equal_count_keep(k: int) -> torch.Tensor:
    keep = torch.zeros(B, N)
    for b in range(B):
        keep[b, torch.randperm(N)[:k]] = 1.0  # different positions in every video
    return keep


def test_all_tokens_shapes(model, video):
    logits = model(video)
    assert logits.shape == (B, 5)
    assert model.fc_norm.normalized_shape == (CFG.embed_dim,) and model.head_new.out_features == 5


@pytest.mark.parametrize("k", [1, 20, 63], ids=["K1", "K20", "K63"])
def test_gather_equals_policy_for_hard_equal_count_masks(model, video, k):
    # Dropped tokens attend to themselves in policy mode, but the masked pool reads only kept tokens,
    # whose attention to dropped keys has weight ~eps/N: the logits agree to ~1e-5.
    keep = _equal_count_keep(k)
    with torch.no_grad():
        gathered = model(video, keep, mode="gather")
        policy = model(video, keep, mode="policy")
        everything = model(video)
    torch.testing.assert_close(policy, gathered, atol=1e-5, rtol=1e-4)
    assert (gathered - everything).abs().max() > 1e-3, "the mask must change the result"


def test_policy_all_ones_equals_no_mask(model, video):
    with torch.no_grad():
        assert_close(model(video, torch.ones(B, N), mode="policy"), model(video), op="policy_attention")
        assert_close(model(video, torch.ones(B, N, dtype=torch.bool), mode="gather"), model(video), op="default")


def test_policy_mode_is_differentiable_in_keep_and_video(model):
    model.train()
    video = torch.randn(B, 3, CFG.num_frames, CFG.image_size, CFG.image_size, requires_grad=True)
    keep = torch.rand(B, N).requires_grad_()
    model(video, keep, mode="policy").sum().backward()
    for name, t in (("keep", keep), ("video", video)):
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and t.grad.abs().sum() > 0, name


def test_policy_mode_accepts_variable_counts(model, video):
    keep = _equal_count_keep(10)
    keep[0, :] = 1.0
    with torch.no_grad():
        out = model(video, keep, mode="policy")
    assert out.shape == (B, 5) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize(
    ("keep", "mode", "match"),
    [
        pytest.param(torch.ones(B, N - 1), "policy", "keep", id="keep-shape"),
        pytest.param(torch.full((B, N), 1.5), "policy", "keep", id="keep-above-1"),
        pytest.param(torch.ones(B, N, dtype=torch.int64), "policy", "keep", id="keep-int"),
        pytest.param(torch.ones(B, N).index_fill(1, torch.arange(5), 0.0).index_fill(0, torch.tensor([0]), 1.0),
                     "gather", "same", id="unequal-counts"),
        pytest.param(torch.zeros(B, N), "gather", "keep", id="nothing-kept"),
        pytest.param(torch.full((B, N), 0.5), "gather", "0/1", id="soft-in-gather"),
        pytest.param(torch.ones(B, N), "pool", "mode", id="unknown-mode"),
    ],
)
def test_bad_keep_or_mode(model, video, keep, mode, match):
    with pytest.raises(ValueError, match=match):
        model(video, keep, mode=mode)


def test_bad_video(model):
    with pytest.raises(ValueError, match="video"):
        model(torch.randn(B, 3, CFG.num_frames, 16, 16))
