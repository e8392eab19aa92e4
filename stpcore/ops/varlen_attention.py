"""Plain softmax attention within each packed sequence (kept tokens of variable-length sets)."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from stpcore.ops import dispatch


def _check(q, k, v, cu_seqlens, max_seqlen):
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"varlen_attention: q, k, v must be (total, H, D) with equal total and H; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"varlen_attention: cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if max_seqlen < 0:
        raise ValueError(f"varlen_attention: max_seqlen must be >= 0, got {max_seqlen}")


def varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, *, scale=None):
    """Reference: scaled_dot_product_attention on each sequence in turn.

    Args:
        q, k: (total, H, D) float.
        v: (total, H, Dv) float.
        cu_seqlens: (B + 1,) int32; sequence b is rows cu_seqlens[b]:cu_seqlens[b+1].
        max_seqlen: longest sequence (unused by the reference; part of the varlen convention).
        scale: softmax scale, default D ** -0.5.

    Returns:
        (total, H, Dv) in q's dtype. Empty sequences produce no rows.
    """
    bounds = cu_seqlens.tolist()
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    pieces = []
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e > s:
            pieces.append(
                F.scaled_dot_product_attention(
                    q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), scale=scale
                ).transpose(0, 1)
            )
    if pieces:
        out = torch.cat(pieces, dim=0)
    return out


def _xformers_reasons(explicit, q, k, v, cu_seqlens, max_seqlen, **_):
    try:
        found = importlib.util.find_spec("xformers") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return ["xformers is not installed (pip install stpcore[xformers])"]
    if q.device.type != "cuda":
        return [f"xformers needs CUDA tensors, got {q.device.type}"]
    return []


def _xformers_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale=None):
    from xformers.ops import fmha  # optional, GPU comparisons only

    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens)
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)
    return out[0]


dispatch.register(
    "varlen_attention",
    dispatch.triton_backend("varlen_attention", "varlen_attention", lambda q, k, v, cu, *a, **kw: [q, k, v, cu],
                            reasons="varlen_attention_reasons"),
)
dispatch.register("varlen_attention", dispatch.Backend("xformers", _xformers_varlen, _xformers_reasons))
dispatch.register("varlen_attention", dispatch.Backend("reference", varlen_attention_ref))


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Attention within each packed sequence; see :func:`varlen_attention_ref` for shapes."""
    _check(q, k, v, cu_seqlens, max_seqlen)
    return dispatch.call("varlen_attention", backend, q, k, v, cu_seqlens, max_seqlen, scale=scale)

