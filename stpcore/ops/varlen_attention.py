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


def _zeros_lse(q):
    return q.new_zeros(q.shape[0], q.shape[1], dtype=torch.float32)


def _reference_fwd(q, k, v, cu_seqlens, max_seqlen, scale):
    """The reference as the op runs it: (out, lse), lse zeros (its backward reruns it)."""
    return varlen_attention_ref(q, k, v, cu_seqlens, max_seqlen, scale=scale), _zeros_lse(q)


def _xformers_fwd(q, k, v, cu_seqlens, max_seqlen, scale):
    return _xformers_varlen(q, k, v, cu_seqlens, max_seqlen, scale=scale), _zeros_lse(q)


dispatch.register("varlen_attention", dispatch.triton_backend(
    "varlen_attention", "varlen_attention_fwd", lambda q, k, v, cu, *a, **kw: [q, k, v, cu],
    reasons="varlen_attention_reasons", bwd="varlen_attention_bwd"))
dispatch.register("varlen_attention", dispatch.Backend("xformers", _xformers_fwd, _xformers_reasons))
dispatch.register("varlen_attention", dispatch.Backend("reference", _reference_fwd))


@torch.library.custom_op("stpcore::varlen_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float,
        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = dispatch.select("varlen_attention", backend or None, q, k, v, cu_seqlens, max_seqlen, scale=scale)
    return tuple(chosen.fn(q, k, v, cu_seqlens, max_seqlen, scale))


@_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, backend):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), _zeros_lse(q)


@torch.library.custom_op("stpcore::varlen_attention_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 scale: float, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = dispatch.select("varlen_attention", backend or None, q, k, v, cu_seqlens, max_seqlen, scale=scale)
    if chosen.bwd is not None:
        return tuple(chosen.bwd(q, k, v, cu_seqlens, max_seqlen, scale, out, lse, dout))
    # xformers (forward only here) and the reference: the reference's gradient, by vjp.
    dq, dk, dv, _ = dispatch.recompute_backward(dispatch.reference("varlen_attention").fn, (q, k, v, cu_seqlens),
                                                (dout,), max_seqlen, scale)
    return dq, dk, dv


@_backward_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, out, lse, dout, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale, backend = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens, *output)
    ctx.max_seqlen, ctx.scale, ctx.backend = max_seqlen, scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.stpcore.varlen_attention_backward(q, k, v, cu_seqlens, ctx.max_seqlen, ctx.scale, out,
                                                              lse, dout, ctx.backend)
    needs = ctx.needs_input_grad
    return dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Attention within each packed sequence; see :func:`varlen_attention_ref` for shapes. ``max_seqlen`` may be
    an upper bound of the longest sequence (no host sync is needed to find the exact one). The op is
    ``torch.ops.stpcore.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, backend)`` -> (out, lse)."""
    _check(q, k, v, cu_seqlens, max_seqlen)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if dispatch.direct_reference("varlen_attention", backend, q, k, v, cu_seqlens, int(max_seqlen), scale=scale):
        return varlen_attention_ref(q, k, v, cu_seqlens, int(max_seqlen), scale=scale)  # plain autograd
    return torch.ops.stpcore.varlen_attention(q, k, v, cu_seqlens, int(max_seqlen), scale, backend or "")[0]
