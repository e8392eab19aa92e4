from __future__ import annotations

import math

import pytest
import torch

from stpcore.models import STPrivacy, STPrivacyConfig, STPrivacyOutput
from stpcore.testing import separate_keep_scores
from stpcore.tubelets import keep_to_pixels

CFG = STPrivacyConfig.from_name("tiny")  # 8 x 32 x 32 clips, 4 slots x 16 tokens, prune before blocks 1, 2, 3
B = 2


@pytest.fixture
def model() -> STPrivacy:
    return STPrivacy(CFG)


@pytest.fixture
def video() -> torch.Tensor:
    return torch.randn(B, 3, CFG.num_frames, CFG.image_size, CFG.image_size)


def _pixel_mask(keep: torch.Tensor) -> torch.Tensor:
    return keep_to_pixels(keep, CFG.grid, CFG.tubelet).expand(-1, 3, -1, -1, -1)  # (B, 3, T, H, W)


def _noise(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-torch.empty(B, CFG.num_tokens, 2).exponential_(generator=g).log() for _ in CFG.prune_locations]


def _check_decisions(out: STPrivacyOutput) -> None:
    prev = torch.ones_like(out.keep.detach())
    for d in out.decisions:
        assert d.shape == prev.shape == (prev.shape[0], CFG.num_tokens)
        assert bool(((d == 0) | (d == 1)).all()), "hard decisions must be exactly 0/1"
        assert bool((d <= prev).all()), "a dropped token was revived"
        prev = d.detach()
    assert torch.equal(out.keep.detach(), prev)


def test_train_forward_shapes_and_hard_decisions(model, video):
    model.train()
    out = model(video)
    assert out.video.shape == video.shape
    assert out.action_logits.shape == (B, CFG.num_classes)
    assert len(out.decisions) == len(out.keep_log_probs) == CFG.num_stages
    assert all(lp.shape == (B, CFG.num_tokens) and bool(torch.isfinite(lp).all()) for lp in out.keep_log_probs)
    assert out.kept_positions is None
    _check_decisions(out)
    # Every tubelet is decoded in training; masked_video hides exactly the dropped ones.
    mask = _pixel_mask(out.keep.detach())
    masked = out.masked_video.detach()
    assert torch.equal(masked[mask == 0], torch.zeros_like(masked[mask == 0]))
    assert torch.equal(masked[mask == 1], out.video.detach()[mask == 1])
    assert (out.video.detach()[mask == 0]).abs().sum() > 0


@pytest.mark.parametrize("keep_ratio", [None, 0.5, 1.0], ids=["cfg-0.7", "0.5", "1.0"])
def test_eval_keeps_k_per_slot_and_zeros_dropped_tubelets(model, video, keep_ratio):
    model.eval()
    with torch.no_grad():
        out = model(video, keep_ratio=keep_ratio)
    expected_k = {None: (11, 7, 5), 0.5: (8, 4, 2), 1.0: (16, 16, 16)}[keep_ratio]
    assert CFG.kept_per_slot(keep_ratio) == expected_k
    _check_decisions(out)
    for d, k in zip(out.decisions, expected_k, strict=True):
        per_slot = d.reshape(B, CFG.num_slots, CFG.tokens_per_slot).sum(-1)
        assert torch.equal(per_slot, torch.full_like(per_slot, k))
    assert out.kept_positions.shape == (B, CFG.num_slots * expected_k[-1])
    assert bool((out.keep.gather(1, out.kept_positions) == 1).all())
    mask = _pixel_mask(out.keep)
    assert torch.equal(out.video[mask == 0], torch.zeros_like(out.video[mask == 0])), "dropped tubelets must be 0"
    assert bool((out.video[mask == 1] != 0).any())
    assert out.action_logits.shape == (B, CFG.num_classes)


def test_eval_topk_selects_the_highest_keep_scores(model, video):
    model.eval()
    with torch.no_grad():
        out = model(video)
    prev = torch.ones(B, CFG.num_tokens)
    for d, lp in zip(out.decisions, out.keep_log_probs, strict=True):
        assert bool(torch.isneginf(lp[prev == 0]).all()), "tokens that did not enter a stage have -inf"
        s = lp.reshape(B, CFG.num_slots, -1)
        kept = d.reshape(B, CFG.num_slots, -1) == 1
        lowest_kept = s.masked_fill(~kept, math.inf).amin(-1)
        highest_dropped = s.masked_fill(kept, -math.inf).amax(-1)
        assert bool((lowest_kept >= highest_dropped).all())
        prev = d


def test_gumbel_noise_reproduces_a_training_step(model, video):
    model.train()
    a = model(video, _noise(1))
    b = model(video, _noise(1))
    c = model(video, _noise(2))
    assert torch.equal(a.video, b.video) and torch.equal(a.action_logits, b.action_logits)
    assert all(torch.equal(x, y) for x, y in zip(a.decisions, b.decisions, strict=True))
    assert not torch.equal(a.decisions[0], c.decisions[0])


def test_backward_reaches_every_parameter(model, video):
    model.train()
    out = model(video, _noise(3))
    # Reconstruction alone: the predictors get gradients only through the straight-through decisions
    # feeding the policy attention.
    (out.video * torch.randn_like(out.video)).sum().backward(retain_graph=True)
    for s in range(CFG.num_stages):
        for name, p in model.score_predictor[s].named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"score_predictor.{s}.{name}"
    assert model.fc_norm.weight.grad is None and model.head.weight.grad is None
    model.zero_grad(set_to_none=True)
    out.action_logits.logsumexp(-1).sum().backward(retain_graph=True)
    (out.video * torch.randn_like(out.video)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().sum() > 0, name


def _separated(model: STPrivacy) -> STPrivacy:
    return separate_keep_scores(model, scale=100.0)


def test_train_with_zero_noise_keeps_what_adaptive_keeps_at_one_half(model, video):
    model = _separated(model)
    zeros = [torch.zeros(B, CFG.num_tokens, 2) for _ in CFG.prune_locations]
    with torch.no_grad():
        model.train()
        train = model(video, zeros)
        model.eval()
        adaptive = model(video, adaptive_threshold=0.5)
    prev = torch.ones(B, CFG.num_tokens)
    for s, (dt, da) in enumerate(zip(train.decisions, adaptive.decisions, strict=True)):
        alive = prev == 1
        margin = (train.keep_log_probs[s][alive] - math.log(0.5)).abs().min()
        assert margin > 1e-3, f"stage {s}: scores not separated enough ({margin:.3g}) for the comparison"
        assert torch.equal(dt, da), f"stage {s}"
        prev = dt
    # Not trivial: the first stage keeps some tokens and drops others, and some survive to the end.
    assert 0 < int(train.decisions[0].sum()) < B * CFG.num_tokens
    assert int(train.keep.sum()) > 0
    # Same kept tokens, nearly the same values: the policy attention leaks only eps-sized weights.
    mask = _pixel_mask(adaptive.keep)
    assert torch.allclose(train.masked_video, adaptive.video, atol=1e-4)
    assert torch.equal(adaptive.video[mask == 0], torch.zeros_like(adaptive.video[mask == 0]))


def test_adaptive_variable_counts_and_an_empty_video(model, video):
    model.eval()

    # Stage 1: video 0 keeps the first 40 tokens with probability 0.9 (the rest 0.1); video 1 drops all.
    def force(module, inputs, output):
        p = torch.full(output.shape[:2], 0.1)
        p[0, :40] = 0.9
        return torch.stack([p.log(), (1 - p).log()], dim=-1)

    handle = model.score_predictor[0].register_forward_hook(force)
    try:
        with torch.no_grad():
            out = model(video, adaptive_threshold=0.5)
    finally:
        handle.remove()
    counts = [d.sum(1).tolist() for d in out.decisions]
    assert counts[0] == [40.0, 0.0]
    assert counts[-1][1] == 0.0
    _check_decisions(out)
    assert torch.equal(out.video[1], torch.zeros_like(out.video[1])), "a video with nothing kept must be all zero"
    mask = _pixel_mask(out.keep)
    assert torch.equal(out.video[mask == 0], torch.zeros_like(out.video[mask == 0]))
    assert bool((out.video[0] != 0).any()) and bool(torch.isfinite(out.action_logits).all())


def test_adaptive_counts_differ_between_videos(model):
    model = _separated(model).eval()
    video = torch.randn(4, 3, CFG.num_frames, CFG.image_size, CFG.image_size)
    with torch.no_grad():
        out = model(video, adaptive_threshold=0.5)
    counts = out.keep.sum(1)
    assert len(set(counts.tolist())) > 1, counts
    _check_decisions(out)


def _video(shape=(B, 3, CFG.num_frames, CFG.image_size, CFG.image_size), fill=None, dtype=torch.float32):
    v = torch.randn(shape).to(dtype)
    if fill is not None:
        v[0, 0, 0, 0, 0] = fill
    return v


@pytest.mark.parametrize(
    ("mode", "kwargs", "match"),
    [
        pytest.param("eval", {"video": torch.randn(3, 8, 32, 32)}, "video", id="video-4d"),
        pytest.param("eval", {"video": _video((B, 1, 8, 32, 32))}, "channels", id="video-1-channel"),
        pytest.param("eval", {"video": _video((B, 3, 7, 32, 32))}, "video", id="T-not-divisible"),
        pytest.param("eval", {"video": _video((B, 3, 4, 32, 32))}, "video", id="T-not-configured"),
        pytest.param("eval", {"video": _video((B, 3, 8, 33, 32))}, "video", id="H-not-divisible"),
        pytest.param("eval", {"video": _video((B, 3, 8, 64, 64))}, "video", id="HW-not-configured"),
        pytest.param("eval", {"video": _video(fill=float("nan"))}, "NaN", id="video-nan"),
        pytest.param("eval", {"video": _video(fill=float("inf"))}, "Inf", id="video-inf"),
        pytest.param("eval", {"video": _video(dtype=torch.int64)}, "video", id="video-int"),
        pytest.param("eval", {"keep_ratio": 0.0}, "keep_ratio", id="keep-ratio-0"),
        pytest.param("eval", {"keep_ratio": 1.2}, "keep_ratio", id="keep-ratio-1.2"),
        pytest.param("eval", {"keep_ratio": float("nan")}, "keep_ratio", id="keep-ratio-nan"),
        pytest.param("eval", {"adaptive_threshold": 1.0}, "adaptive_threshold", id="threshold-1"),
        pytest.param("eval", {"adaptive_threshold": 0.5, "keep_ratio": 0.5}, "keep_ratio", id="both"),
        pytest.param("eval", {"gumbel_noise": []}, "gumbel_noise", id="noise-in-eval"),
        pytest.param("train", {"keep_ratio": 0.5}, "keep_ratio", id="keep-ratio-in-train"),
        pytest.param("train", {"gumbel_noise": [torch.zeros(B, 64, 2)]}, "gumbel_noise", id="noise-length"),
        pytest.param("train", {"gumbel_noise": [torch.zeros(B, 63, 2)] * 3}, r"gumbel_noise\[0\]", id="noise-shape"),
    ],
)
def test_bad_input_raises_naming_the_argument(model, mode, kwargs, match):
    model.train(mode == "train")
    kwargs = dict(kwargs)
    video = kwargs.pop("video", None)
    if video is None:
        video = _video()
    with pytest.raises(ValueError, match=match):
        model(video, **kwargs)


def test_without_prune_locations_every_token_is_kept(video):
    model = STPrivacy(STPrivacyConfig.from_name("tiny", prune_locations=()))
    outs = [model.train()(video)]
    model.eval()
    with torch.no_grad():
        outs += [model(video), model(video, adaptive_threshold=0.5)]
    for out in outs:
        assert out.decisions == [] and torch.equal(out.keep.detach(), torch.ones(B, CFG.num_tokens))
    torch.testing.assert_close(outs[1].video, outs[2].video)  # both run plain attention on all tokens


def _compare_backends(cfg, device: str, fast: str, monkeypatch) -> None:
    """The whole model with the ``fast`` backend against every op's reference, fp32: train mode with fixed
    Gumbel noise (decisions, video, loss and every parameter's gradient) and eval mode (keep and video)."""
    torch.manual_seed(0)
    net = STPrivacy(cfg).to(device)
    clips = torch.randn(2, 3, cfg.num_frames, cfg.image_size, cfg.image_size, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    noise = [-torch.empty(2, cfg.num_tokens, 2, device=device).exponential_(generator=g).log()
             for _ in cfg.prune_locations]
    runs = {}
    for backend in ("reference", fast):
        if backend == "auto":
            monkeypatch.delenv("STPCORE_BACKEND", raising=False)
        else:
            monkeypatch.setenv("STPCORE_BACKEND", backend)
        net.train().zero_grad(set_to_none=True)
        out = net(clips, noise)
        loss = out.action_logits.logsumexp(-1).mean() + out.video.square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        with torch.no_grad():
            ev = net.eval()(clips)
        runs[backend] = (out, loss.detach(), grads, ev)
    (out_r, loss_r, grads_r, ev_r), (out_a, loss_a, grads_a, ev_a) = runs["reference"], runs[fast]
    assert [torch.equal(a, b) for a, b in zip(out_r.decisions, out_a.decisions, strict=True)] == [True] * 3
    torch.testing.assert_close(out_a.video, out_r.video, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_a, loss_r, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_r.keys() and len(grads_r) > 10
    for name in grads_r:
        torch.testing.assert_close(grads_a[name], grads_r[name], rtol=1e-3, atol=1e-4, msg=name)
    assert (ev_a.keep == ev_r.keep).float().mean() >= 0.99
    same = (ev_a.keep == ev_r.keep).all(dim=1)
    assert same.any(), "no video kept the same tokens under both backends: the video comparison would be empty"
    torch.testing.assert_close(ev_a.video[same], ev_r.video[same], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check; the GPU runs the test below")
def test_whole_model_through_the_triton_kernels_in_the_interpreter(monkeypatch):
    """Every kernel wired into the model (policy attention at head dim 32, Gumbel selection, predictor pool,
    top-k gather, scatter), run by Triton's interpreter on CPU, against the references."""
    pytest.importorskip("triton")
    _compare_backends(STPrivacyConfig.from_name("tiny", num_heads=3), "cpu", "triton", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("preset, overrides", [("tiny", {"num_heads": 3}), ("vit_small", {})],
                         ids=["tiny-head32", "vit_small"])
def test_whole_model_kernels_match_reference_gpu(preset, overrides, monkeypatch):
    """The whole model on CUDA, fp32 (TF32 off): dispatch's choice (the kernels) against the references."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _compare_backends(STPrivacyConfig.from_name(preset, **overrides), "cuda", "auto", monkeypatch)


def _with_and_without(options: dict, free_options: dict, mode: str):
    """The tiny model with ``options`` and its twin with ``free_options`` (same weights), run on the same clips and
    Gumbel noise in ``mode`` ("train", "topk" or "adaptive" at 0.5, which drops most tubelets of this model):
    (output, twin's output, output's video and twin's video as (B, N, pixels, 3) tubelets)."""
    from stpcore.tubelets import to_tubelets

    torch.manual_seed(0)
    cfg = STPrivacyConfig.from_name("tiny", **options)
    model = STPrivacy(cfg)
    free = STPrivacy(STPrivacyConfig.from_name("tiny", **free_options))
    free.load_state_dict(model.state_dict())
    clips = torch.randn(2, 3, 8, 32, 32)
    kwargs = {"adaptive": {"adaptive_threshold": 0.5}}.get(mode, {})
    model.train(mode == "train")
    free.train(mode == "train")
    torch.manual_seed(1)
    out = model(clips, **kwargs)
    torch.manual_seed(1)
    ref = free(clips, **kwargs)
    tubelets = [to_tubelets(o.video, cfg.tubelet).unflatten(-1, (-1, 3)) for o in (out, ref)]
    return out, ref, *tubelets


@pytest.mark.parametrize("mode", ["train", "topk", "adaptive"])
def test_zero_mean_tubelets_remove_each_tubelets_own_colour(mode):
    out, ref, pixels, want = _with_and_without({"zero_mean_tubelets": True}, {}, mode)
    means = pixels.mean(dim=-2)
    assert means.abs().max() < 1e-5  # kept tubelets: no colour of their own; dropped: exactly 0
    if mode != "train":  # the same decisions: the free output minus its tubelet means, where kept
        assert torch.equal(out.keep, ref.keep)
        assert (out.keep == 0).any() and (out.keep == 1).any()
        torch.testing.assert_close(pixels, (want - want.mean(dim=-2, keepdim=True)) * out.keep[..., None, None],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pixels, want)


@pytest.mark.parametrize("options", [{}, {"sign_free_tubelets": True}, {"zero_mean_tubelets": True}],
                         ids=["signed", "sign-free", "zero-mean-first"])
@pytest.mark.parametrize("mode", ["train", "topk", "adaptive"])
def test_binary_output_is_two_levels(mode, options):
    free_options = {"zero_mean_tubelets": True} if options.get("zero_mean_tubelets") else {}  # before binarising
    out, ref, pixels, free_pixels = _with_and_without({"binary_output": True, **options}, free_options, mode)
    grey = free_pixels.mean(dim=-1, keepdim=True)
    want = torch.where(grey >= 0, 1.0, -1.0)
    if options.get("sign_free_tubelets"):  # each tubelet flipped so that -1 is its majority
        want = want * torch.where(want.sum(dim=-2, keepdim=True) >= 0, -1.0, 1.0)
        assert (pixels[..., 0].sum(dim=-1) <= 0).all()
    want = want.expand_as(pixels)
    if mode == "train":  # every tubelet decoded, each pixel one of the two levels
        torch.testing.assert_close(pixels, want, rtol=0, atol=0)
        assert set(out.video.unique().tolist()) == {-1.0, 1.0}
    else:  # dropped tubelets exactly 0, kept ones the free output's grey sign in all three channels
        assert torch.equal(out.keep, ref.keep)
        assert (out.keep == 0).any() and (out.keep == 1).any()
        torch.testing.assert_close(pixels, want * out.keep[..., None, None], rtol=0, atol=0)
        kept = pixels[out.keep.bool()]
        assert set(kept.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("sign_free", [False, True], ids=["signed", "sign-free"])
def test_binary_output_gradient_is_straight_through(sign_free):
    """The gradient is the grey mean's (identity straight-through), also where |grey| > 1; the sign-free flip is a
    constant for it."""
    torch.manual_seed(0)
    cfg = STPrivacyConfig.from_name("tiny", binary_output=True, sign_free_tubelets=sign_free)
    model = STPrivacy(cfg)
    with torch.no_grad():
        model.head_recon.weight.mul_(20.0)  # decoded values well beyond +-1, as a fitted decoder writes
    tokens = torch.randn(2, 5, cfg.embed_dim, requires_grad=True)
    weights = torch.randn(2, 5, cfg.tubelet_dim)
    (model._decode(tokens) * weights).sum().backward()
    got = tokens.grad.clone()
    tokens.grad = None
    grey = model.head_recon(model.norm_recon(tokens)).unflatten(-1, (-1, 3)).mean(dim=-1, keepdim=True)
    assert (grey.abs() > 1).float().mean() > 0.3
    flip = torch.ones(())
    if sign_free:
        flip = torch.where(torch.where(grey >= 0, 1.0, -1.0).sum(dim=-2, keepdim=True) >= 0, -1.0, 1.0).detach()
        assert (flip == 1).any() and (flip == -1).any()
    (grey * flip * weights.unflatten(-1, (-1, 3)).sum(dim=-1, keepdim=True)).sum().backward()
    torch.testing.assert_close(got, tokens.grad)
    assert got.abs().sum() > 0


def test_sign_free_tubelets_need_binary_output():
    with pytest.raises(ValueError, match="binary_output=True"):
        STPrivacyConfig.from_name("tiny", sign_free_tubelets=True)
