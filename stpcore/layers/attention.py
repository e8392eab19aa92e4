"""Multi-head self-attention in three forms: plain, with a per-key keep policy, and over packed sets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stpcore import ops


class Attention(nn.Module):
    """Multi-head self-attention (module names ``qkv`` / ``proj`` as in the release; qkv has a bias).

    Which attention runs depends on the arguments of :meth:`forward`:

    - neither ``policy`` nor ``cu_seqlens``: plain softmax attention over the whole sequence
      (``F.scaled_dot_product_attention``);
    - ``policy``: STPrivacy's training-mode masked attention, ``stpcore.ops.policy_attention``
      (Triton on CUDA, the chunked PyTorch path on CPU);
    - ``cu_seqlens``: packed variable-length sequences, ``stpcore.ops.varlen_attention``.

    Args:
        dim: channels D, divisible by num_heads.
        num_heads: attention heads.
        qkv_bias: bias on the qkv projection (True in ViT-S).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        *,
        policy: torch.Tensor | None = None,
        eps: float = 1e-6,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Self-attention.

        Args:
            x: (B, N, D) float; or (total, D) packed rows when ``cu_seqlens`` is given.
            policy: (B, N) float in [0, 1], keep decision per key token (training-mode masked attention);
                differentiable.
            eps: smoothing of the policy attention (1e-6 in the release).
            cu_seqlens: (B + 1,) int32 offsets of the packed sequences.
            max_seqlen: longest packed sequence (required with cu_seqlens).

        Returns:
            Same shape and dtype as x.
        """
        if cu_seqlens is not None:
            if policy is not None:
                raise ValueError("Attention: policy and cu_seqlens cannot be combined")
            if max_seqlen is None:
                raise ValueError("Attention: max_seqlen is required with cu_seqlens")
            total, D = x.shape
            qkv = self.qkv(x).reshape(total, 3, self.num_heads, self.head_dim)  # (total, 3, H, d)
            q, k, v = qkv.unbind(1)  # each (total, H, d)
            out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # (total, H, d)
            return self.proj(out.reshape(total, D))
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv.unbind(0)
        if policy is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ops.policy_attention(q, k, v, policy, eps=eps)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
