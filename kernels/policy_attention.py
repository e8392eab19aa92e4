"""Fused Triton kernels for policy attention (STPrivacy / DynamicViT training-mode attention).

Computes exactly :func:`stpcore.ops.policy_attention.policy_attention_ref` (see that module's docstring
for the formula and the closed-form backward), FlashAttention-2 style: the (B, H, N, N) score matrix is
never written to memory.

Forward (one program per (query block, b * H + h)): walk over key blocks with an online softmax in fp32.
Scores are kept in log2 units (q.k scaled by scale * log2(e) in one multiply), so every exponential is one
exp2, and one reduction gives each key block's max and its first position. The differences from plain
attention:

- the row max m_i is over ALL keys, kept or not (the release subtracts it before applying the policy),
  so every key block is visited for the max, and the policy only multiplies the exponentials:
  W_ij = exp(S_ij - m_i) * (p_j + (1 - p_j) [i == j]);
- the eps smoothing adds eps / N * sum_j v_j to the numerator and eps to the denominator; sum_j v_j does
  not depend on the max or the query, so it is reduced once per (b, h) on the host (not once per query
  block) and added at the end: out_i = (sum_j W_ij v_j + eps / N * sum_j v_j) * 1 / (Z_i + eps), with one
  reciprocal per row;
- fp16 only: the weights are accumulated relative to the running max of the log-weights
  S_ij + log(p_j) over the keys that count, then scaled back by exp(that max - m_i) at the end. With the
  release's m_i alone, a dropped key scoring far above every kept one makes all kept weights tiny, and
  they underflow when cast to fp16 for the P.V dot (bf16 and fp32 have fp32's exponent range).

Saved for backward: the row max m (log2 units), 1 / den = 1 / (Z + eps) (fp32) and the argmax column (int32),
all (B, H, N), and sum_j v_j (B, H, Dv) fp32. The argmax routes the tiny dm_i term of the max's gradient, so
gradients match the direct formulation. The backward multiplies by the saved reciprocal instead of dividing
element by element.

Backward, deterministic (no atomics), in three launches:

1. preprocess (query-major): Dl_i = dO_i . out_i and dm_i = -(eps Dl_i - eps / N dO_i . sum_j v_j) / den_i;
2. key-block-major: dk, dv and d(policy) for one key block, looping over all query blocks. d(policy)
   sums over queries here and over heads afterwards: each program writes its (b, h) partial into a
   (B, H, N) fp32 buffer that is summed over H in PyTorch. That buffer is B*H*N*4 bytes (300 KiB at the
   paper's shape), and it keeps the result deterministic, which atomics across heads would not;
3. query-block-major: dq, looping over all key blocks. Recomputing the scores once more (7 instead of 5
   N^2 D matmuls per head) buys a deterministic dq without atomics or a (B, H, N, D) fp32 scratch.

All matmuls accumulate in fp32; fp16/bf16 operands go to tl.dot as they are (FlashAttention's rule:
probabilities and dS are cast to the input dtype before their matmul). fp32 inputs use IEEE fp32 dots
unless ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch's own matmul does.
"""

from __future__ import annotations

import contextlib
import math

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
from stpcore.kernels._tiles import Tiles, default_attention_tiles, measured_tiles, tile_key

# Tiles set by use_tiles() (the sweep); empty: measured tiles, else the defaults. A module global rather than a
# context variable: autograd runs CUDA backwards on its own device threads, which would not see a context's value.
_TILE_OVERRIDE: dict[str, Tiles | None] = {}


# --------------------------------------------------------------------------------------------- kernels
#
# Each kernel loops over blocks through a @triton.jit tile function. The loop itself comes in two forms,
# chosen by the INTERPRET constexpr: a `for` over range() on the GPU (so Triton can software-pipeline
# the loads), and a `while` in the interpreter, whose range() cannot take a runtime bound with numpy >= 2.4
# (it calls int() on a 1-element array). Only one form is ever compiled.


@triton.jit
def _fwd_tile(
    q, offs_m, start_n, k_base, v_base, p_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, N, qk_scale,
    m_i, w_i, z_i, arg_i, acc,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    KEPT_MAX: tl.constexpr,
):
    # Scores are in log2 units (qk_scale = scale * log2(e)), so every exponential is one exp2.
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    col_ok = offs_n < N
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, log2 units
    s = tl.where(col_ok[None, :], s, float("-inf"))
    # One reduction gives the block's max and its first position (ties go left, as torch.max reports them);
    # only a strictly larger block max moves the running argmax.
    blk_max, blk_arg = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
    arg_i = tl.where(blk_max > m_i, blk_arg.to(tl.int32) + start_n, arg_i)
    m_new = tl.maximum(m_i, blk_max)
    p = tl.load(p_base + offs_n * stride_pn, mask=col_ok, other=0.0).to(tl.float32)
    diag = offs_m[:, None] == offs_n[None, :]  # every query sees itself, whatever the policy says
    if KEPT_MAX:
        # fp16: acc and z run relative to w_i, the running max of the log-weights S_ij + log2 M_ij, not to
        # m_i. When the highest score is on a dropped key, 2^(S - m) * M of every kept key can be far
        # below 1 and would underflow when cast to fp16 for the dot; relative to w_i the largest weight is 1.
        # The epilogue multiplies by 2^(w_i - m_i) to return to the release's scale.
        lw = tl.where(diag, s, s + tl.log2(p)[None, :])  # -inf where the policy is 0 (or the column invalid)
        w_new = tl.maximum(w_i, tl.max(lw, 1))
        base = tl.where(w_new == float("-inf"), 0.0, w_new)  # no kept key seen yet: keep zeros, avoid NaN
        alpha = tl.exp2(w_i - base)
        w = tl.exp2(lw - base[:, None])
    else:
        w_new = m_new
        alpha = tl.exp2(m_i - m_new)  # 2^-inf = 0 on the first block (every block has a valid column)
        e = tl.exp2(s - m_new[:, None])
        w = tl.where(diag, e, e * p[None, :])
    z_i = z_i * alpha + tl.sum(w, 1)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
    return m_new, w_new, z_i, arg_i, acc


@triton.jit
def _policy_attn_fwd_kernel(
    Q, K, V, P, VSum, Out, RowMax, InvDen, ArgMax,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, qk_scale, eps, eps_over_n,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    KEPT_MAX: tl.constexpr,
):
    # Bytes moved per program: its q block once, then all N keys and values (N (D + Dv) elements), the
    # N policy values and the Dv sums of v; writes BLOCK_M (Dv + 3) values.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    p_base = P + b * stride_pb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < N
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    w_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    z_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    arg_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    if INTERPRET:
        start_n = 0
        while start_n < N:
            m_i, w_i, z_i, arg_i, acc = _fwd_tile(
                q, offs_m, start_n, k_base, v_base, p_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                N, qk_scale, m_i, w_i, z_i, arg_i, acc, HEAD_DIM, HEAD_DIM_V, BLOCK_N, PRECISION, KEPT_MAX)
            start_n += BLOCK_N
    else:
        for start_n in range(0, N, BLOCK_N):
            m_i, w_i, z_i, arg_i, acc = _fwd_tile(
                q, offs_m, start_n, k_base, v_base, p_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
                N, qk_scale, m_i, w_i, z_i, arg_i, acc, HEAD_DIM, HEAD_DIM_V, BLOCK_N, PRECISION, KEPT_MAX)

    # sum_j v_j was reduced once per (b, h) on the host, not once per query block here.
    v_sum = tl.load(VSum + pid_bh.to(tl.int64) * HEAD_DIM_V + offs_dv)
    f = tl.exp2(w_i - m_i)  # 1 without KEPT_MAX; 0 on padding rows that saw no kept key (not stored)
    inv_den = 1.0 / (z_i * f + eps)  # one reciprocal per row; the backward reuses it
    out = (acc * f[:, None] + eps_over_n * v_sum[None, :]) * inv_den[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    stat = pid_bh.to(tl.int64) * N + offs_m  # (B, H, N) contiguous statistics
    tl.store(RowMax + stat, m_i, mask=row_ok)  # in log2 units, as the backward recomputes its scores
    tl.store(InvDen + stat, inv_den, mask=row_ok)
    tl.store(ArgMax + stat, arg_i, mask=row_ok)


@triton.jit
def _policy_attn_bwd_preprocess_kernel(
    Out, DO, VSum, InvDen, Delta, DMax,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, eps, eps_over_n,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Dl_i = dO_i . out_i, and the max's gradient dm_i = -(eps Dl_i - eps / N dO_i . sum_j v_j) / den_i.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < N
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    v_sum = tl.load(VSum + pid_bh.to(tl.int64) * HEAD_DIM_V + offs_dv)
    stat = pid_bh.to(tl.int64) * N + offs_m
    inv_den = tl.load(InvDen + stat, mask=row_ok, other=1.0)
    delta = tl.sum(do * o, 1)
    dmax = -(eps * delta - eps_over_n * tl.sum(do * v_sum[None, :], 1)) * inv_den
    tl.store(Delta + stat, delta, mask=row_ok)
    tl.store(DMax + stat, dmax, mask=row_ok)


@triton.jit
def _dkdv_tile(
    k, v, p, offs_n, start_m, q_base, do_base, RowMax, InvDen, ArgMax, Delta, DMax, stat_base,
    stride_qn, stride_qd, stride_don, stride_dod, N, qk_scale, eps_over_n, dk, dv, dp,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < N
    valid = row_ok[:, None] & (offs_n < N)[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_dod, mask=row_ok[:, None],
                 other=0.0)
    m = tl.load(RowMax + stat_base + offs_m, mask=row_ok, other=0.0)
    inv_den = tl.load(InvDen + stat_base + offs_m, mask=row_ok, other=1.0)
    delta = tl.load(Delta + stat_base + offs_m, mask=row_ok, other=0.0)
    dmax = tl.load(DMax + stat_base + offs_m, mask=row_ok, other=0.0)
    arg = tl.load(ArgMax + stat_base + offs_m, mask=row_ok, other=-1)

    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    e = tl.where(valid, tl.exp2(s - m[:, None]), 0.0)
    diag = offs_m[:, None] == offs_n[None, :]
    w = tl.where(diag, e, e * p[None, :])
    a = tl.where(valid, (w + eps_over_n) * inv_den[:, None], 0.0)  # the attention weights A_ij
    dv += tl.dot(tl.trans(a.to(do.dtype)), do, input_precision=PRECISION)
    g = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # g_ij = dO_i . v_j
    dw = (g - delta[:, None]) * inv_den[:, None]
    dp += tl.sum(tl.where(diag, 0.0, e * dw), 0)  # M_ij does not depend on p_j on the diagonal
    ds = w * dw + tl.where(offs_n[None, :] == arg[:, None], dmax[:, None], 0.0)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv, dp


@triton.jit
def _policy_attn_bwd_dkdv_kernel(
    Q, K, V, P, DO, RowMax, InvDen, ArgMax, Delta, DMax, DK, DV, DP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, scale, qk_scale, eps_over_n,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One key block, all query blocks: reads N (D + Dv) q/dO elements and 5 N statistics per program;
    # writes dk, dv (contiguous (B, H, N, D/Dv)) and the (b, h) partial of d(policy).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    stat_base = pid_bh.to(tl.int64) * N

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    col_ok = offs_n < N
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None], other=0.0)
    p = tl.load(P + b * stride_pb + offs_n * stride_pn, mask=col_ok, other=0.0).to(tl.float32)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)
    dp = tl.zeros([BLOCK_N], dtype=tl.float32)
    if INTERPRET:
        start_m = 0
        while start_m < N:
            dk, dv, dp = _dkdv_tile(
                k, v, p, offs_n, start_m, q_base, do_base, RowMax, InvDen, ArgMax, Delta, DMax, stat_base,
                stride_qn, stride_qd, stride_don, stride_dod, N, qk_scale, eps_over_n, dk, dv, dp,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, PRECISION)
            start_m += BLOCK_M
    else:
        for start_m in range(0, N, BLOCK_M):
            dk, dv, dp = _dkdv_tile(
                k, v, p, offs_n, start_m, q_base, do_base, RowMax, InvDen, ArgMax, Delta, DMax, stat_base,
                stride_qn, stride_qd, stride_don, stride_dod, N, qk_scale, eps_over_n, dk, dv, dp,
                HEAD_DIM, HEAD_DIM_V, BLOCK_M, PRECISION)

    dk = dk * scale
    rows = stat_base + offs_n  # dk, dv are contiguous (B, H, N, D)
    tl.store(DK + rows[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + rows[:, None] * HEAD_DIM_V + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DP + rows, dp, mask=col_ok)


@triton.jit
def _dq_tile(
    q, do, m, inv_den, delta, dmax, arg, offs_m, start_n, k_base, v_base, p_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, N, qk_scale, dq,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    col_ok = offs_n < N
    valid = (offs_m < N)[:, None] & col_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
    p = tl.load(p_base + offs_n * stride_pn, mask=col_ok, other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
    e = tl.where(valid, tl.exp2(s - m[:, None]), 0.0)
    w = tl.where(offs_m[:, None] == offs_n[None, :], e, e * p[None, :])
    g = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    dw = (g - delta[:, None]) * inv_den[:, None]
    ds = w * dw + tl.where(offs_n[None, :] == arg[:, None], dmax[:, None], 0.0)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _policy_attn_bwd_dq_kernel(
    Q, K, V, P, DO, RowMax, InvDen, ArgMax, Delta, DMax, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N, scale, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One query block, all key blocks: reads N (D + Dv) k/v elements and N policy values per program.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    p_base = P + b * stride_pb
    stat_base = pid_bh.to(tl.int64) * N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < N
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    m = tl.load(RowMax + stat_base + offs_m, mask=row_ok, other=0.0)
    inv_den = tl.load(InvDen + stat_base + offs_m, mask=row_ok, other=1.0)
    delta = tl.load(Delta + stat_base + offs_m, mask=row_ok, other=0.0)
    dmax = tl.load(DMax + stat_base + offs_m, mask=row_ok, other=0.0)
    arg = tl.load(ArgMax + stat_base + offs_m, mask=row_ok, other=-1)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if INTERPRET:
        start_n = 0
        while start_n < N:
            dq = _dq_tile(q, do, m, inv_den, delta, dmax, arg, offs_m, start_n, k_base, v_base, p_base,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, N, qk_scale, dq,
                          HEAD_DIM, HEAD_DIM_V, BLOCK_N, PRECISION)
            start_n += BLOCK_N
    else:
        for start_n in range(0, N, BLOCK_N):
            dq = _dq_tile(q, do, m, inv_den, delta, dmax, arg, offs_m, start_n, k_base, v_base, p_base,
                          stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, N, qk_scale, dq,
                          HEAD_DIM, HEAD_DIM_V, BLOCK_N, PRECISION)

    dq = dq * scale
    rows = stat_base + offs_m  # dq is contiguous (B, H, N, D)
    tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------- host launchers


def _blocks(N: int, head_dim: int, dtype: torch.dtype, device: torch.device, pass_: str = "fwd") -> Tiles:
    """The tiles of one pass ("fwd" or "bwd"): a sweep's override, else the measured ones committed in
    kernels/tiles.json for this GPU, dtype and head dim, else the shared heuristic's."""
    if INTERPRET or device.type != "cuda":
        return default_attention_tiles(N, head_dim, dtype, device)
    if _TILE_OVERRIDE.get(pass_) is not None:
        return _TILE_OVERRIDE[pass_]
    tuned = measured_tiles("policy_attention", device, tile_key(dtype, head_dim, dot_precision(dtype)), pass_)
    return tuned if tuned is not None else default_attention_tiles(N, head_dim, dtype, device)


@contextlib.contextmanager
def use_tiles(fwd: Tiles | None = None, bwd: Tiles | None = None):
    """Run the kernels with these tiles inside the block, in every thread (the tile sweep of benchmarks/gpu/
    uses this; not for concurrent use)."""
    saved = dict(_TILE_OVERRIDE)
    _TILE_OVERRIDE.update(fwd=fwd, bwd=bwd)
    try:
        yield
    finally:
        _TILE_OVERRIDE.clear()
        _TILE_OVERRIDE.update(saved)


def _policy_attn_fwd(q, k, v, policy, eps: float):
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    out = torch.empty(B, H, N, Dv, dtype=q.dtype, device=q.device)
    row_max = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    inv_den = torch.empty_like(row_max)
    arg_max = torch.empty(B, H, N, dtype=torch.int32, device=q.device)
    v_sum = v.sum(dim=2, dtype=torch.float32).contiguous()  # (B, H, Dv) sum_j v_j: eps / N term and dm
    block_m, block_n, warps, stages = _blocks(N, max(D, Dv), q.dtype, q.device, "fwd")
    grid = (triton.cdiv(N, block_m), B * H)
    _policy_attn_fwd_kernel[grid](
        q, k, v, policy, v_sum, out, row_max, inv_den, arg_max,
        *q.stride(), *k.stride(), *v.stride(), policy.stride(0), policy.stride(1), *out.stride(),
        H, N, D**-0.5 * LOG2E, eps, eps / N,
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
        INTERPRET=INTERPRET, KEPT_MAX=q.dtype == torch.float16, num_warps=warps, num_stages=stages,
    )
    return out, v_sum, row_max, inv_den, arg_max


def _policy_attn_bwd(q, k, v, policy, out, v_sum, row_max, inv_den, arg_max, dout, eps: float):
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    block_m, block_n, warps, stages = _blocks(N, max(D, Dv), q.dtype, q.device, "bwd")
    precision = dot_precision(q.dtype)
    delta = torch.empty_like(row_max)
    dmax = torch.empty_like(row_max)
    _policy_attn_bwd_preprocess_kernel[(triton.cdiv(N, block_m), B * H)](
        out, dout, v_sum, inv_den, delta, dmax, *out.stride(), *dout.stride(),
        H, N, eps, eps / N, HEAD_DIM_V=Dv, BLOCK_M=block_m, num_warps=warps, num_stages=stages,
    )
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, H, N, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, H, N, Dv, dtype=v.dtype, device=q.device)
    dp_heads = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    common = (*q.stride(), *k.stride(), *v.stride(), policy.stride(0), policy.stride(1), *dout.stride())
    meta = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, INTERPRET=INTERPRET,
                num_warps=warps, num_stages=stages)
    scale = D**-0.5
    _policy_attn_bwd_dkdv_kernel[(triton.cdiv(N, block_n), B * H)](
        q, k, v, policy, dout, row_max, inv_den, arg_max, delta, dmax, dk, dv, dp_heads, *common,
        H, N, scale, scale * LOG2E, eps / N, **meta,
    )
    _policy_attn_bwd_dq_kernel[(triton.cdiv(N, block_m), B * H)](
        q, k, v, policy, dout, row_max, inv_den, arg_max, delta, dmax, dq, *common, H, N, scale, scale * LOG2E,
        **meta,
    )
    dp = dp_heads.sum(dim=1).to(policy.dtype)  # (B, N): the head sum, deterministic
    return dq, dk, dv, dp


# --------------------------------------------------------------------------------------- autograd + entry


class _PolicyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, policy, eps):
        with device_guard(q):
            out, v_sum, row_max, inv_den, arg_max = _policy_attn_fwd(q, k, v, policy, eps)
        ctx.save_for_backward(q, k, v, policy, out, v_sum, row_max, inv_den, arg_max)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, policy, out, v_sum, row_max, inv_den, arg_max = ctx.saved_tensors
        with device_guard(q):
            dq, dk, dv, dp = _policy_attn_bwd(q, k, v, policy, out, v_sum, row_max, inv_den, arg_max, dout,
                                              ctx.eps)
        return dq, dk, dv, dp if ctx.needs_input_grad[3] else None, None


def policy_attention_fwd(q, k, v, policy, eps: float):
    """The forward of ``torch.ops.stpcore.policy_attention``: (out, v_sum, row_max, inv_den, arg_max)."""
    with device_guard(q):
        return _policy_attn_fwd(q, k, v, policy, eps)


def policy_attention_bwd(q, k, v, policy, out, v_sum, row_max, inv_den, arg_max, dout, eps: float):
    """The backward of ``torch.ops.stpcore.policy_attention``: (dq, dk, dv, dpolicy)."""
    with device_guard(q):
        return _policy_attn_bwd(q, k, v, policy, out, v_sum, row_max, inv_den, arg_max, dout, eps)


def not_supported_reasons(q, k, v, policy, *, eps: float = 1e-6, **_) -> list[str]:
    """Why these inputs cannot run in these kernels (empty list: they can). Device checks are the dispatcher's.

    Args:
        q, k: (B, H, N, D); v: (B, H, N, Dv); policy: (B, N).
        eps: the smoothing term.
    """
    reasons = []
    if q.dtype not in DTYPES:
        reasons.append(f"dtype {q.dtype} is not one of fp16, bf16, fp32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not policy.is_floating_point():
        reasons.append(f"policy dtype {policy.dtype} is not floating point")
    if q.dim() == 4:
        if q.shape[-1] not in HEAD_DIMS:
            reasons.append(f"head dim {q.shape[-1]} is not one of {HEAD_DIMS}")
        if v.dim() == 4 and v.shape[-1] not in HEAD_DIMS:
            reasons.append(f"value head dim {v.shape[-1]} is not one of {HEAD_DIMS}")
        if q.shape[0] * q.shape[1] > MAX_GRID_Y:
            reasons.append(f"B * H = {q.shape[0] * q.shape[1]} exceeds the grid limit {MAX_GRID_Y}")
        if q.shape[2] == 0:
            reasons.append("N = 0 (no tokens)")
    else:
        reasons.append(f"q must be (B, H, N, D), got shape {tuple(q.shape)}")
    if not math.isfinite(eps) or eps < 0:
        reasons.append(f"eps must be finite and >= 0, got {eps}")
    return reasons + interpreter_reasons(q, k, v, policy)


def policy_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """Policy attention in fused Triton kernels; same values and gradients as ``policy_attention_ref``.

    Args:
        q, k: (B, H, N, D) fp16, bf16 or fp32, D in {16, 32, 64, 128}; any strides (e.g. views of a
            permuted (B, N, 3, H, D) qkv tensor).
        v: (B, H, N, Dv) same dtype, Dv in {16, 32, 64, 128}.
        policy: (B, N) float in [0, 1]; differentiable.
        eps: attention smoothing (1e-6 in the release).

    Returns:
        (B, H, N, Dv) contiguous, q's dtype. Differentiable in q, k, v and policy; backward saves only
        the output, three (B, H, N) statistics and the (B, H, Dv) sum of v besides the inputs.
    """
    reasons = not_supported_reasons(q, k, v, policy, eps=eps)
    if reasons:
        raise NotImplementedError("policy_attention (triton): " + "; ".join(reasons))
    return _PolicyAttention.apply(q, k, v, policy, float(eps))
