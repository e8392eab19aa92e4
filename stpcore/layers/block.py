"""Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

from __future__ import annotations

import torch
from torch import nn

from stpcore.layers.attention import Attention
from stpcore.layers.mlp import Mlp


class Block(nn.Module):
    """One ViT block (module names ``norm1``, ``attn``, ``norm2``, ``mlp`` as in the release).

    LayerNorm eps is 1e-6 and the MLP uses GELU, as in timm's ViT. No drop-path or dropout: the release
    trains without them at this scale [G]; add them here if an ablation needs them.

    Args:
        dim: channels D.
        num_heads: attention heads.
        mlp_ratio: MLP hidden channels / D.
        qkv_bias: bias on the qkv projection.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,
        *,
        policy: torch.Tensor | None = None,
        eps: float = 1e-6,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """x (B, N, D), or packed (total, D) with cu_seqlens -> same shape; see :meth:`Attention.forward`."""
        x = x + self.attn(self.norm1(x), policy=policy, eps=eps, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return x + self.mlp(self.norm2(x))
