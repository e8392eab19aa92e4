from __future__ import annotations

import torch
import torch.nn.functional as F

from stpcore import ops
from stpcore.layers import Attention, TubeletEmbed
from stpcore.testing import assert_close
from stpcore.tubelets import to_tubelets


def test_tubelet_embed_is_t_major_and_channel_innermost():
    embed = TubeletEmbed(12, (2, 4, 4))
    video = torch.randn(2, 3, 4, 8, 12)
    tokens = embed(video)  # (B, N, D)
    assert tokens.shape == (2, 2 * 2 * 3, 12)
    # The conv is a linear map of each tubelet's pixels, flattened as to_tubelets flattens them.
    w = embed.proj.weight.permute(0, 2, 3, 4, 1).reshape(12, -1)  # (D, pt*ph*pw*C)
    expected = to_tubelets(video, (2, 4, 4)) @ w.T + embed.proj.bias
    assert_close(tokens, expected, op="default")


def test_policy_attention_with_all_ones_is_plain_attention():
    attn = Attention(24, 3)
    x = torch.randn(2, 10, 24)
    plain = attn(x)
    masked = attn(x, policy=torch.ones(2, 10), eps=1e-6)
    assert_close(masked, plain, op="policy_attention")
    # A real policy changes the result (the mask is applied, not ignored).
    policy = torch.ones(2, 10)
    policy[:, 3:] = 0
    assert (attn(x, policy=policy) - plain).abs().max() > 1e-3


def test_varlen_attention_equals_per_video_attention():
    attn = Attention(24, 3)
    x = torch.randn(3, 9, 24)
    keep = torch.rand(3, 9) > 0.4
    keep[2] = False  # an empty video packs to no rows
    packed = ops.pack(x, keep)
    out = attn(packed.values, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)  # (total, D)
    expected = torch.cat([attn(x[b : b + 1, keep[b]])[0] for b in range(3)])
    assert out.shape == (int(keep.sum()), 24)
    assert_close(out, expected, op="varlen_attention")


def test_sdpa_path_matches_explicit_softmax():
    attn = Attention(16, 2)
    x = torch.randn(1, 5, 16)
    q, k, v = attn.qkv(x).reshape(1, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = F.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1) @ v  # (1, H, N, d)
    expected = attn.proj(ref.transpose(1, 2).reshape(1, 5, 16))
    assert_close(attn(x), expected, op="default")
