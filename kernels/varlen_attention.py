"""Triton softmax attention over packed variable-length sequences (the kept tokens of each video).

Layout (flash-attention's varlen convention): q, k, v are (total, H, D) with sequence b in rows
cu_seqlens[b]:cu_seqlens[b+1] (cu_seqlens int32 (B+1,)); ``max_seqlen`` bounds the longest sequence.
The grid is (query blocks of max_seqlen, B * H); a program whose block starts past its own sequence's
end exits at once, and the others loop only over their own sequence's keys, so the work follows
sum_b L_b^2 rather than B * max_seqlen^2.

Forward keeps the log-sum-exp per row (base 2, fp32, (total, H)) for backward. Backward as in
FlashAttention-2: Delta_i = dO_i . out_i, then a key-block-major kernel for dk, dv and a
query-block-major kernel for dq; each program writes only its own rows, so there are no atomics and the
gradients are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stpcore.kernels._launch import (
    DTYPES,
    HEAD_DIMS,
    INTERPRET,
    LOG2E,
    MAX_GRID_Y,
    device_guard,
    dot_precision,
    interpreter_reasons,
)
from stpcore.kernels._tiles import default_attention_tiles

# --------------------------------------------------------------------------------------------- kernels
#
# Loops come in two forms chosen by the INTERPRET constexpr: `for ... in range()` on the GPU (software
# pipelined by Triton) and `while` in the interpreter, whose range() cannot take a runtime bound with
# numpy >= 2.4. The loop bodies are shared @triton.jit tile functions.


@triton.jit
def _fwd_tile(
    q, start_n, seq_start, seq_len, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
    m_i, l_i, acc,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < seq_len
    rows_n = (seq_start + offs_n).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k = tl.load(k_base + rows_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + rows_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, CuSeqlens, Out, Lse,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    H, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # Per live program: its q block, then L (D + Dv) key/value elements of its own sequence.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)
    seq_start = tl.load(CuSeqlens + b)
    seq_len = tl.load(CuSeqlens + b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < seq_len
    pos_m = (seq_start + offs_m).to(tl.int64)
    q = tl.load(Q + h * stride_qh + pos_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None],
                other=0.0)
    k_base = K + h * stride_kh
    v_base = V + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    if INTERPRET:
        start_n = 0
        while start_n < seq_len:
            m_i, l_i, acc = _fwd_tile(q, start_n, seq_start, seq_len, k_base, v_base, stride_kt, stride_kd,
                                      stride_vt, stride_vd, qk_scale, m_i, l_i, acc,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_N, PRECISION)
            start_n += BLOCK_N
    else:
        for start_n in range(0, seq_len, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, start_n, seq_start, seq_len, k_base, v_base, stride_kt, stride_kd,
                                      stride_vt, stride_vd, qk_scale, m_i, l_i, acc,
                                      HEAD_DIM, HEAD_DIM_V, BLOCK_N, PRECISION)

    out = acc * (1.0 / l_i)[:, None]  # one reciprocal per row, not BLOCK_M x Dv divisions
    tl.store(Out + h * stride_oh + pos_m[:, None] * stride_ot + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + pos_m * H + h, m_i + tl.log2(l_i), mask=row_ok)  # (total, H), base 2


@triton.jit
def _varlen_attn_bwd_preprocess_kernel(
    Out, DO, Delta, total, H,
    stride_ot, stride_oh, stride_od, stride_dot, stride_doh, stride_dod,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Delta_i = dO_i . out_i over (total, H) rows: reads 2 total H Dv elements, writes total H fp32.
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < total
    o = tl.load(Out + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + h * stride_doh + offs_m[:, None] * stride_dot + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + offs_m * H + h, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_tile(
    k, v, offs_n, start_m, seq_start, seq_len, q_base, do_base, Lse, Delta, h, H,
    stride_qt, stride_qd, stride_dot, stride_dod, qk_scale, dk, dv,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < seq_len
    pos_m = (seq_start + offs_m).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = tl.load(q_base + pos_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + pos_m[:, None] * stride_dot + offs_dv[None, :] * stride_dod, mask=row_ok[:, None],
                 other=0.0)
    lse = tl.load(Lse + pos_m * H + h, mask=row_ok, other=0.0)
    delta = tl.load(Delta + pos_m * H + h, mask=row_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    valid = row_ok[:, None] & (offs_n < seq_len)[None, :]
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N) attention weights
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, CuSeqlens, DO, Lse, Delta, DK, DV,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    H, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One key block of one sequence, all its query blocks: reads L (D + Dv) q/dO elements per program.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)
    seq_start = tl.load(CuSeqlens + b)
    seq_len = tl.load(CuSeqlens + b + 1) - seq_start
    start_n = pid_n * BLOCK_N
    if start_n >= seq_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    col_ok = offs_n < seq_len
    rows_n = (seq_start + offs_n).to(tl.int64)
    k = tl.load(K + h * stride_kh + rows_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=col_ok[:, None],
                other=0.0)
    v = tl.load(V + h * stride_vh + rows_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    q_base = Q + h * stride_qh
    do_base = DO + h * stride_doh

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)
    if INTERPRET:
        start_m = 0
        while start_m < seq_len:
            dk, dv = _dkdv_tile(k, v, offs_n, start_m, seq_start, seq_len, q_base, do_base, Lse, Delta, h, H,
                                stride_qt, stride_qd, stride_dot, stride_dod, qk_scale, dk, dv,
                                HEAD_DIM, HEAD_DIM_V, BLOCK_M, PRECISION)
            start_m += BLOCK_M
    else:
        for start_m in range(0, seq_len, BLOCK_M):
            dk, dv = _dkdv_tile(k, v, offs_n, start_m, seq_start, seq_len, q_base, do_base, Lse, Delta, h, H,
                                stride_qt, stride_qd, stride_dot, stride_dod, qk_scale, dk, dv,
                                HEAD_DIM, HEAD_DIM_V, BLOCK_M, PRECISION)

    dk = dk * scale
    tl.store(DK + h * stride_dkh + rows_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None])
    tl.store(DV + h * stride_dvh + rows_n[:, None] * stride_dvt + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit
def _dq_tile(
    q, do, lse, delta, offs_m, start_n, seq_start, seq_len, k_base, v_base,
    stride_kt, stride_kd, stride_vt, stride_vd, qk_scale, dq,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < seq_len
    rows_n = (seq_start + offs_n).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k = tl.load(k_base + rows_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + rows_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    valid = (offs_m < seq_len)[:, None] & col_ok[None, :]
    p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, CuSeqlens, DO, Lse, Delta, DQ,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_dot, stride_doh, stride_dod,
    stride_dqt, stride_dqh,
    H, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One query block of one sequence, all its key blocks: reads L (D + Dv) k/v elements per program.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = (pid_bh % H).to(tl.int64)
    seq_start = tl.load(CuSeqlens + b)
    seq_len = tl.load(CuSeqlens + b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seq_len:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < seq_len
    pos_m = (seq_start + offs_m).to(tl.int64)
    q = tl.load(Q + h * stride_qh + pos_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None],
                other=0.0)
    do = tl.load(DO + h * stride_doh + pos_m[:, None] * stride_dot + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + pos_m * H + h, mask=row_ok, other=0.0)
    delta = tl.load(Delta + pos_m * H + h, mask=row_ok, other=0.0)
    k_base = K + h * stride_kh
    v_base = V + h * stride_vh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if INTERPRET:
        start_n = 0
        while start_n < seq_len:
            dq = _dq_tile(q, do, lse, delta, offs_m, start_n, seq_start, seq_len, k_base, v_base,
                          stride_kt, stride_kd, stride_vt, stride_vd, qk_scale, dq,
                          HEAD_DIM, HEAD_DIM_V, BLOCK_N, PRECISION)
            start_n += BLOCK_N
    else:
        for start_n in range(0, seq_len, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, offs_m, start_n, seq_start, seq_len, k_base, v_base,
                          stride_kt, stride_kd, stride_vt, stride_vd, qk_scale, dq,
                          HEAD_DIM, HEAD_DIM_V, BLOCK_N, PRECISION)

    dq = dq * scale
    tl.store(DQ + h * stride_dqh + pos_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------- host launchers


def _varlen_fwd(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    total, H, D = q.shape
    Dv = v.shape[-1]
    B = cu_seqlens.numel() - 1
    out = torch.empty(total, H, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(total, H, dtype=torch.float32, device=q.device)
    if total == 0 or max_seqlen == 0 or B == 0:
        return out, lse
    block_m, block_n, warps, stages = default_attention_tiles(max_seqlen, max(D, Dv), q.dtype, q.device)
    _varlen_attn_fwd_kernel[(triton.cdiv(max_seqlen, block_m), B * H)](
        q, k, v, cu_seqlens, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, scale * LOG2E,
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
        INTERPRET=INTERPRET, num_warps=warps, num_stages=stages,
    )
    return out, lse


def _varlen_bwd(q, k, v, cu_seqlens, max_seqlen: int, scale: float, out, lse, dout):
    H, D = q.shape[1], q.shape[2]
    Dv = v.shape[-1]
    B = cu_seqlens.numel() - 1
    total = out.shape[0]
    # Packed (total, H, D) gradients in the input dtype; zeros for rows no sequence covers.
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=q.device)
    if total == 0 or max_seqlen == 0 or B == 0:
        return dq, dk, dv
    block_m, block_n, warps, stages = default_attention_tiles(max_seqlen, max(D, Dv), q.dtype, q.device)
    delta = torch.empty(total, H, dtype=torch.float32, device=q.device)
    _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(total, 64), H)](
        out, dout, delta, total, H, *out.stride(), *dout.stride(), HEAD_DIM_V=Dv, BLOCK_M=64,
    )
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
                INTERPRET=INTERPRET, num_warps=warps, num_stages=stages)
    _varlen_attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen, block_n), B * H)](
        q, k, v, cu_seqlens, dout, lse, delta, dk, dv, *common,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), H, scale, scale * LOG2E, **meta,
    )
    _varlen_attn_bwd_dq_kernel[(triton.cdiv(max_seqlen, block_m), B * H)](
        q, k, v, cu_seqlens, dout, lse, delta, dq, *common, dq.stride(0), dq.stride(1),
        H, scale, scale * LOG2E, **meta,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------- autograd + entry


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        with device_guard(q):
            out, lse = _varlen_fwd(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
        with device_guard(q):
            dq, dk, dv = _varlen_bwd(q, k, v, cu_seqlens, ctx.max_seqlen, ctx.scale, out, lse, dout)
        return dq, dk, dv, None, None, None


def varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    """The forward of ``torch.ops.stpcore.varlen_attention``: (out, lse)."""
    with device_guard(q):
        return _varlen_fwd(q, k, v, cu_seqlens, int(max_seqlen), float(scale))


def varlen_attention_bwd(q, k, v, cu_seqlens, max_seqlen: int, scale: float, out, lse, dout):
    """The backward of ``torch.ops.stpcore.varlen_attention``: (dq, dk, dv)."""
    with device_guard(q):
        return _varlen_bwd(q, k, v, cu_seqlens, int(max_seqlen), float(scale), out, lse, dout)


def varlen_attention_reasons(q, k, v, cu_seqlens, max_seqlen, *, scale: float | None = None) -> list[str]:
    """Why :func:`varlen_attention` cannot run these inputs (empty: it can); device checks are the dispatcher's."""
    reasons = []
    if q.dtype not in DTYPES:
        reasons.append(f"dtype {q.dtype} is not one of fp16, bf16, fp32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        reasons.append("q, k, v must be (total, H, D)")
    else:
        if q.shape[-1] not in HEAD_DIMS:
            reasons.append(f"head dim {q.shape[-1]} is not one of {HEAD_DIMS}")
        if v.shape[-1] not in HEAD_DIMS:
            reasons.append(f"value head dim {v.shape[-1]} is not one of {HEAD_DIMS}")
        if cu_seqlens is not None and (cu_seqlens.numel() - 1) * q.shape[1] > MAX_GRID_Y:
            reasons.append(f"B * H exceeds the grid limit {MAX_GRID_Y}")
    if cu_seqlens is None or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        reasons.append("cu_seqlens must be a 1-D int32 tensor")
    if max_seqlen is None or int(max_seqlen) < 0:
        reasons.append(f"max_seqlen must be >= 0, got {max_seqlen}")
    return reasons + interpreter_reasons(q, k, v)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, *,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention within each packed sequence; same values and gradients as ``varlen_attention_ref``.

    Args:
        q, k: (total, H, D) fp16, bf16 or fp32, D in {16, 32, 64, 128}; any strides.
        v: (total, H, Dv) same dtype, Dv in {16, 32, 64, 128}.
        cu_seqlens: (B + 1,) int32 on q's device; sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]; empty
            sequences are allowed.
        max_seqlen: an upper bound of the longest sequence (rows of longer sequences past it are not
            computed: it sizes the grid, and is not checked, to avoid a device sync).
        scale: softmax scale, default D ** -0.5.

    Returns:
        (total, H, Dv) contiguous, q's dtype; differentiable in q, k, v.
    """
    reasons = varlen_attention_reasons(q, k, v, cu_seqlens, max_seqlen)
    if reasons:
        raise NotImplementedError("varlen_attention (triton): " + "; ".join(reasons))
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return _VarlenAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), scale)
