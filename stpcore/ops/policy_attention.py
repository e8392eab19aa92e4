"""Attention with a keep policy over keys: the training-mode attention of STPrivacy (and DynamicViT).

Semantics (the authors' release), per video b, head h, query i and key j, with N the sequence length::

    S_ij = q_i . k_j / sqrt(D)
    M_ij = p_j + (1 - p_j) [i == j]            every query always sees itself
    m_i  = max_j S_ij                           over ALL keys, kept or not
    E_ij = exp(S_ij - m_i)                      in fp32
    A_ij = (E_ij M_ij + eps / N) / (sum_j E_ij M_ij + eps)
    out_i = sum_j A_ij v_j

Three implementations compute this one function:

- ``policy_attention_ref``: the release's direct formulation, autograd through every step. It keeps
  several (B, H, N, N) fp32 tensors alive for backward. This is the specification.
- ``policy_attention_chunked``: the same values and gradients (the closed form below, eps and max
  terms included) from a custom autograd.Function that walks over query chunks and saves only
  O(B H N) statistics for backward. The CPU path.
- ``stpcore.kernels.policy_attention``: the fused Triton kernels (CUDA).

Closed-form backward, with g_ij = dO_i . v_j, Dl_i = dO_i . out_i, den_i = Z_i + eps, W = E * M::

    dW_ij = (g_ij - Dl_i) / den_i
    dS_ij = W_ij dW_ij  +  [j == argmax_j S_ij] dm_i,   dm_i = -sum_j W_ij dW_ij
    dp_j  = sum_{h, i != j} E_ij dW_ij
    dv_j  = sum_i A_ij dO_i,   dq = scale dS k,   dk = scale dS^T q

dm_i is of order eps (it is -(eps Dl_i - eps/N sum_j g_ij) / den_i); it is carried so the gradients
match the direct formulation exactly.

A property of these semantics (not of an implementation): because m_i includes dropped keys, a dropped key
scoring about 14 or more (in scaled logits) above every kept one makes sum_j E_ij M_ij smaller than eps,
and out_i drifts towards the plain mean of ALL values, dropped ones included. Training paths (recognizers,
phase 2) follow the release here; inference gathers the kept tokens and never sees this.
"""

from __future__ import annotations

import math

import torch

from stpcore.ops import dispatch

DEFAULT_EPS = 1e-6


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"policy_attention: q must be (B, H, N, D), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"policy_attention: q, k, v must be (B, H, N, D) with equal B, H, N (and q, k equal D); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, _, N, _ = q.shape
    if policy.shape != (B, N):
        raise ValueError(f"policy_attention: policy must be (B, N) = ({B}, {N}), got {tuple(policy.shape)}")


def policy_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, *, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """The release's masked attention, written out step by step (the specification).

    Args:
        q, k: (B, H, N, D) any float dtype.
        v: (B, H, N, Dv) same dtype.
        policy: (B, N) in [0, 1], the keep decision per key token.
        eps: smoothing of the attention weights (1e-6 in the release).

    Returns:
        (B, H, N, Dv) in the dtype of q.
    """
    _check(q, k, v, policy)
    B, _, N, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    attn = (q @ k.transpose(-2, -1)).to(acc) * (D**-0.5)  # (B, H, N, N), scaled and max-shifted in fp32
    eye = torch.eye(N, dtype=policy.dtype, device=policy.device)
    p = policy.reshape(B, 1, 1, N)
    attn_policy = p + (1.0 - p) * eye  # (B, 1, N, N)
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = attn - max_att
    attn = attn.exp() * attn_policy.to(acc)
    attn = (attn + eps / N) / (attn.sum(dim=-1, keepdim=True) + eps)
    return (attn.to(q.dtype) @ v).to(q.dtype)


def _chunk_rows(B: int, H: int, N: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"policy_attention_chunked: chunk_size must be >= 1, got {chunk_size}")
        return min(chunk_size, N)
    # About 2**20 fp32 scores (4 MiB) per (B, H, rows, N) temporary.
    return max(1, min(N, (1 << 20) // max(1, B * H * N)))


def _chunked_fwd(q, k, v, policy, eps: float, chunk_size: int | None = None):
    """The chunked forward: (out, v_sum, row_max, den, arg_max), the op's outputs (see :func:`policy_attention`); this
    backend keeps the softmax denominator itself in the slot where the Triton kernel keeps its inverse, so its
    backward divides exactly as the direct formulation does."""
    # Views of a fused qkv projection are strided; every chunk's matmuls would copy them again (in the
    # forward and twice in the backward), so copy once here.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, D = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5
    rows = _chunk_rows(B, H, N, chunk_size)
    c = eps / N
    vf = v.to(acc)
    vsum = vf.sum(dim=-2, keepdim=True)  # (B, H, 1, Dv)
    pf = policy.to(acc).reshape(B, 1, 1, N)
    out = torch.empty(B, H, N, v.shape[-1], dtype=acc, device=q.device)
    row_max = torch.empty(B, H, N, dtype=acc, device=q.device)
    den = torch.empty(B, H, N, dtype=acc, device=q.device)
    arg_max = torch.empty(B, H, N, dtype=torch.int32, device=q.device)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        S = (q[:, :, s:e] @ k.transpose(-2, -1)).to(acc) * scale  # (B, H, r, N)
        m, am = S.max(dim=-1, keepdim=True)
        E = (S - m).exp_()
        W = _apply_policy(E, pf, s, e)
        Z = W.sum(dim=-1, keepdim=True) + eps
        out[:, :, s:e] = (W @ vf + c * vsum) / Z
        row_max[:, :, s:e] = m.squeeze(-1)
        den[:, :, s:e] = Z.squeeze(-1)
        arg_max[:, :, s:e] = am.squeeze(-1)
    return out.to(q.dtype), vsum.squeeze(-2), row_max, den, arg_max


def _chunked_bwd(q, k, v, policy, out, v_sum, row_max, den, arg_max, dout, eps: float,
                 chunk_size: int | None = None):
    """The closed-form backward of :func:`_chunked_fwd` (module docstring): (dq, dk, dv, dpolicy)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, N, D = q.shape
    acc = row_max.dtype
    scale = D**-0.5
    rows = _chunk_rows(B, H, N, chunk_size)
    c = eps / N
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    pf = policy.to(acc).reshape(B, 1, 1, N)
    dof = dout.to(acc)
    delta = (dof * out.to(acc)).sum(dim=-1, keepdim=True)  # (B, H, N, 1)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    dp = torch.zeros(B, N, dtype=acc, device=q.device)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        # Recompute the scores exactly as the forward did (same ops, same dtype), so the saved row maxima
        # and argmax positions agree with them.
        S = (q[:, :, s:e] @ k.transpose(-2, -1)).to(acc) * scale
        E = (S - row_max[:, :, s:e, None]).exp_()
        W = _apply_policy(E, pf, s, e)
        Z = den[:, :, s:e, None]
        A = (W + c) / Z
        do = dof[:, :, s:e]
        dv += A.transpose(-2, -1) @ do
        dW = ((do @ vf.transpose(-2, -1)) - delta[:, :, s:e]) / Z  # (B, H, r, N)
        EdW = E * dW
        # d(policy): column sums over heads and queries, the diagonal (i == j) excluded.
        diag = torch.arange(s, e, device=q.device)
        rows_idx = torch.arange(e - s, device=q.device)
        dp += EdW.sum(dim=(1, 2)) - _diag_add(EdW[..., rows_idx, diag].sum(dim=1), N, s, e)
        dS = W * dW
        dm = -dS.sum(dim=-1, keepdim=True)
        dS.scatter_add_(-1, arg_max[:, :, s:e, None].long(), dm)
        dS *= scale
        dq[:, :, s:e] = dS @ kf
        dk += dS.transpose(-2, -1) @ qf[:, :, s:e]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dp.to(policy.dtype)


class _ChunkedPolicyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, policy, eps, chunk_size):
        out, *stats = _chunked_fwd(q, k, v, policy, eps, chunk_size)
        ctx.save_for_backward(q, k, v, policy, out, *stats)
        ctx.eps, ctx.chunk_size = eps, chunk_size
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = _chunked_bwd(*ctx.saved_tensors, dout, ctx.eps, ctx.chunk_size)
        return (*grads, None, None)


def _apply_policy(E: torch.Tensor, pf: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """E * M for query rows s:e: the policy on keys, and 1 on each query's own key."""
    W = E * pf
    rows_idx = torch.arange(e - s, device=E.device)
    cols = torch.arange(s, e, device=E.device)
    W[..., rows_idx, cols] = E[..., rows_idx, cols]
    return W


def _diag_add(values: torch.Tensor, N: int, s: int, e: int) -> torch.Tensor:
    """(B, r) values at columns s:e, placed into a zero (B, N) row."""
    full = values.new_zeros(values.shape[0], N)
    full[:, s:e] = values
    return full


def policy_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``policy_attention_ref`` computed over query chunks, with a closed-form backward.

    Same arguments and result as :func:`policy_attention_ref`; ``chunk_size`` query rows are processed
    at a time (default: about 4 MiB of fp32 scores per temporary). Saves q, k, v, policy, the output
    and two (B, H, N) fp32 statistics for backward instead of several (B, H, N, N) tensors.
    """
    _check(q, k, v, policy)
    return _ChunkedPolicyAttention.apply(q, k, v, policy, eps, chunk_size)


def _tensors(q, k, v, policy, **_):
    return [q, k, v, policy]


def _reference_fwd(q, k, v, policy, eps):
    """The direct formulation; its statistics are zeros (its backward reruns it under autograd)."""
    B, H, N, _ = q.shape
    out = policy_attention_ref(q, k, v, policy, eps=eps)
    acc = torch.promote_types(q.dtype, torch.float32)
    zeros = q.new_zeros(B, H, N, dtype=acc)
    return out, q.new_zeros(B, H, v.shape[-1], dtype=acc), zeros, zeros.clone(), q.new_zeros(B, H, N, dtype=torch.int32)


dispatch.register("policy_attention", dispatch.triton_backend(
    "policy_attention", "policy_attention_fwd", _tensors, bwd="policy_attention_bwd"))
dispatch.register("policy_attention", dispatch.Backend(
    "chunked", lambda q, k, v, policy, eps: _chunked_fwd(q, k, v, policy, eps), bwd=_chunked_bwd))
dispatch.register("policy_attention", dispatch.Backend("reference", _reference_fwd))


# The op as torch sees it: one graph node under torch.compile; the backend is chosen when it runs.
@torch.library.custom_op("stpcore::policy_attention", mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, eps: float,
        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = dispatch.select("policy_attention", backend or None, q, k, v, policy, eps=eps)
    return tuple(chosen.fn(q, k, v, policy, eps))


@_op.register_fake
def _(q, k, v, policy, eps, backend):
    B, H, N, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    return (q.new_empty(B, H, N, v.shape[-1]), q.new_empty(B, H, v.shape[-1], dtype=acc),
            q.new_empty(B, H, N, dtype=acc), q.new_empty(B, H, N, dtype=acc), q.new_empty(B, H, N, dtype=torch.int32))


@torch.library.custom_op("stpcore::policy_attention_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, out: torch.Tensor,
                 v_sum: torch.Tensor, row_max: torch.Tensor, den_stat: torch.Tensor, arg_max: torch.Tensor,
                 dout: torch.Tensor, eps: float, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = dispatch.select("policy_attention", backend or None, q, k, v, policy, eps=eps)
    if chosen.bwd is not None:
        return tuple(chosen.bwd(q, k, v, policy, out, v_sum, row_max, den_stat, arg_max, dout, eps))
    return tuple(dispatch.recompute_backward(dispatch.reference("policy_attention").fn, (q, k, v, policy), (dout,),
                                             eps))


@_backward_op.register_fake
def _(q, k, v, policy, out, v_sum, row_max, den_stat, arg_max, dout, eps, backend):
    # Dense, whatever the inputs' strides (views of a fused qkv): every backend returns contiguous gradients.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), policy.new_empty(policy.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, policy, eps, backend = inputs
    ctx.save_for_backward(q, k, v, policy, *output)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, dout, *_stats):
    dq, dk, dv, dp = torch.ops.stpcore.policy_attention_backward(*ctx.saved_tensors, dout, ctx.eps, ctx.backend)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None, dp if needs[3] else None,
            None, None)


_op.register_autograd(_backward, setup_context=_setup_context)


def policy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
    backend: str | None = None,
) -> torch.Tensor:
    """Masked attention with a per-key keep policy (see the module docstring for the formula).

    The custom op ``torch.ops.stpcore.policy_attention(q, k, v, policy, eps, backend)`` returns the output and
    the statistics the backward reads: v_sum (B, H, Dv), row_max and the denominator (B, H, N; its inverse from
    the Triton kernel, the denominator itself from the chunked path), in fp32 (fp64 for fp64 inputs), and arg_max
    (B, H, N) int32 (zeros from the reference backend, whose backward reruns it).

    Args:
        q, k: (B, H, N, D) float.
        v: (B, H, N, Dv) float.
        policy: (B, N) float in [0, 1]; differentiable.
        eps: attention smoothing, 1e-6 in the release.
        backend: None (automatic: "triton" for CUDA tensors, else "chunked"), "triton", "chunked" or
            "reference" (the direct formulation).

    Returns:
        (B, H, N, Dv) in q's dtype. Differentiable in q, k, v and policy.
    """
    _check(q, k, v, policy)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"policy_attention: eps must be a finite number >= 0, got {eps}")
    if dispatch.direct_reference("policy_attention", backend, q, k, v, policy, eps=float(eps)):
        return policy_attention_ref(q, k, v, policy, eps=eps)  # plain autograd (see stpcore.ops.dispatch)
    return torch.ops.stpcore.policy_attention(q, k, v, policy, float(eps), backend or "")[0]
