"""Per-slot top-k token selection and token gather/scatter, in Triton.

Top-k without a sort: one program loads a temporal slot's scores (up to _MAX_PER_SLOT of them, 49 in
the paper) and ranks every score by pairwise comparison,

    rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i},

which is a permutation of 0..P-1 (equal scores are ordered by index, so ties break deterministically
towards the lower index, as slot_topk_ref's stable sort does). Token i is kept
when rank_i < k, and its output position is the number of kept tokens before it (an exclusive prefix
sum), so the kept indices come out ascending, as slot_topk_ref returns them. The fused
:func:`slot_topk_gather` copies the kept rows in the same program: one launch, and x is read only at
kept rows. NaN ranks above every number (torch's sort and topk order), NaNs among themselves by index,
so a slot keeps exactly k tokens whatever its scores are.

Bytes moved (paper's stage 1, B=32, N=392, k=34 x 8 slots, C=384, bf16): scores 4 B/token read,
idx 8 B/kept token and kept rows 2*C B/kept token written, kept rows 2*C B/kept token read.

Gradients: gather and scatter are each other's backward. The gather's backward accumulates with atomic
adds (into fp32 for fp16/bf16), so repeated indices sum like torch's; with distinct indices every
address gets one add into zero, which is exact and deterministic. A scatter with repeated indices keeps
an arbitrary one of the rows, as torch's scatter does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stpcore.kernels._launch import device_guard, interpreter_reasons

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_PER_SLOT = 1024  # the rank tile is per_slot x BLOCK_J compares held in registers
_TILE = 4096  # elements per program tile of the copies and comparisons: 16 KB of fp32 in flight


@triton.jit
def _slot_topk_gather_kernel(
    scores_ptr, x_ptr, idx_ptr, kept_ptr,
    stride_sb, stride_sn,
    stride_xb, stride_xn, stride_xc,
    stride_ib,
    stride_kb, stride_kn,
    k, C,
    PER_SLOT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    GATHER: tl.constexpr,
):
    # PER_SLOT is a compile-time constant (one specialisation per model shape) because Triton 3.6's
    # interpreter cannot run a loop with a runtime bound under NumPy 2.4 (int() of a 1-element array).
    # grid: (B, num_slots, channel blocks); every channel block recomputes the (cheap) ranks so that the
    # copy is spread over more programs; only channel block 0 writes the indices.
    b = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1)
    cb = tl.program_id(2)
    i = tl.arange(0, BLOCK_P)
    valid_i = i < PER_SLOT
    s_base = scores_ptr + b * stride_sb + (slot * PER_SLOT).to(tl.int64) * stride_sn
    s_i = tl.load(s_base + i * stride_sn, mask=valid_i, other=0.0)
    nan_i = s_i != s_i
    rank = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for j0 in range(0, PER_SLOT, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        valid_j = j < PER_SLOT
        s_j = tl.load(s_base + j * stride_sn, mask=valid_j, other=0.0)
        nan_j = s_j != s_j
        # NaN ranks above every number (torch's sort order); NaNs and equal numbers tie, lower index first.
        above = (nan_j[None, :] & ~nan_i[:, None]) | (s_j[None, :] > s_i[:, None])
        tie = (nan_j[None, :] & nan_i[:, None]) | (s_j[None, :] == s_i[:, None])
        beats = above | (tie & (j[None, :] < i[:, None]))
        rank += tl.sum((beats & valid_j[None, :]).to(tl.int32), axis=1)
    kept = (rank < k) & valid_i
    kept_i32 = kept.to(tl.int32)
    pos = tl.cumsum(kept_i32, axis=0) - kept_i32  # exclusive prefix count: ascending output order
    kept = kept & (pos < k)  # ranks are a permutation, so this never binds; it keeps every store in the slot
    out_row = slot * k + pos  # (BLOCK_P,) row in the (B, S*k) output
    src_row = slot * PER_SLOT + i  # (BLOCK_P,) token index in the (B, N) input
    tl.store(idx_ptr + b * stride_ib + out_row, src_row.to(tl.int64), mask=kept & (cb == 0))
    if GATHER:
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        m = kept[:, None] & (c[None, :] < C)
        v = tl.load(x_ptr + b * stride_xb + src_row.to(tl.int64)[:, None] * stride_xn + c[None, :] * stride_xc,
                    mask=m)
        tl.store(kept_ptr + b * stride_kb + out_row.to(tl.int64)[:, None] * stride_kn + c[None, :], v, mask=m)


@triton.jit
def _gather_rows_kernel(
    x_ptr, idx_ptr, out_ptr,
    stride_xb, stride_xn, stride_xc,
    stride_ib, stride_ik,
    stride_ob, stride_ok,
    K, C,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[b, r, :] = x[b, idx[b, r], :]; grid (B, row blocks, channel blocks)
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = r < K
    src = tl.load(idx_ptr + b * stride_ib + r * stride_ik, mask=r_mask, other=0).to(tl.int64)
    m = r_mask[:, None] & (c[None, :] < C)
    v = tl.load(x_ptr + b * stride_xb + src[:, None] * stride_xn + c[None, :] * stride_xc, mask=m)
    tl.store(out_ptr + b * stride_ob + r.to(tl.int64)[:, None] * stride_ok + c[None, :], v, mask=m)


@triton.jit
def _scatter_rows_kernel(
    x_ptr, idx_ptr, out_ptr,
    stride_xb, stride_xk, stride_xc,
    stride_ib, stride_ik,
    stride_ob, stride_on,
    K, C,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    # out[b, idx[b, r], :] (+)= x[b, r, :] into a zeroed out; grid (B, row blocks, channel blocks)
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = r < K
    dst = tl.load(idx_ptr + b * stride_ib + r * stride_ik, mask=r_mask, other=0).to(tl.int64)
    m = r_mask[:, None] & (c[None, :] < C)
    v = tl.load(x_ptr + b * stride_xb + r.to(tl.int64)[:, None] * stride_xk + c[None, :] * stride_xc, mask=m)
    ptrs = out_ptr + b * stride_ob + dst[:, None] * stride_on + c[None, :]
    if ACCUMULATE:
        # relaxed: nothing reads the sums before the kernel ends, so no ordering (acq_rel fences) is needed.
        tl.atomic_add(ptrs, v.to(out_ptr.dtype.element_ty), mask=m, sem="relaxed")
    else:
        tl.store(ptrs, v, mask=m)


def _copy_blocks(C: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(max(C, 1)), 128)
    return max(1, _TILE // block_c), block_c


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    B, _, C = x.shape
    K = idx.shape[1]
    out = torch.empty(B, K, C, device=x.device, dtype=x.dtype)
    if out.numel():
        block_k, block_c = _copy_blocks(C)
        grid = (B, triton.cdiv(K, block_k), triton.cdiv(C, block_c))
        with device_guard(x):
            _gather_rows_kernel[grid](
                x, idx, out, x.stride(0), x.stride(1), x.stride(2), idx.stride(0), idx.stride(1),
                out.stride(0), out.stride(1), K, C, BLOCK_K=block_k, BLOCK_C=block_c,
            )
    return out


def _scatter(x: torch.Tensor, idx: torch.Tensor, seqlen: int, accumulate: bool) -> torch.Tensor:
    B, K, C = x.shape
    # Accumulate low precision in fp32: atomics on fp16/bf16 are not available everywhere, and sums of
    # repeated indices round once instead of per add.
    acc_dtype = torch.float32 if accumulate and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    out = torch.zeros(B, seqlen, C, device=x.device, dtype=acc_dtype)
    if x.numel():
        block_k, block_c = _copy_blocks(C)
        grid = (B, triton.cdiv(K, block_k), triton.cdiv(C, block_c))
        with device_guard(x):
            _scatter_rows_kernel[grid](
                x, idx, out, x.stride(0), x.stride(1), x.stride(2), idx.stride(0), idx.stride(1),
                out.stride(0), out.stride(1), K, C, BLOCK_K=block_k, BLOCK_C=block_c, ACCUMULATE=accumulate,
            )
    return out.to(x.dtype)


def _slot_topk_gather(scores: torch.Tensor, x: torch.Tensor | None, num_slots: int, k: int,
                      idx_out: torch.Tensor | None = None):
    """(idx (B, S*k) int64, kept (B, S*k, C) or None); without x only the indices are computed.
    ``idx_out``: a (B, S*k) int64 view with unit column stride to write the indices into (tests use it
    to check that nothing is written outside)."""
    B, N = scores.shape
    per_slot = N // num_slots
    idx = torch.empty(B, num_slots * k, device=scores.device, dtype=torch.int64) if idx_out is None else idx_out
    block_p = max(16, triton.next_power_of_2(per_slot))
    block_j = min(block_p, max(16, _TILE // block_p))
    gather = x is not None
    if gather:
        C = x.shape[2]
        kept = torch.empty(B, num_slots * k, C, device=x.device, dtype=x.dtype)
        block_c = max(16, min(triton.next_power_of_2(C), _TILE // block_p))
        n_cb = max(1, triton.cdiv(C, block_c))  # C == 0 still needs the program that writes idx
        x_args = (x, kept, x.stride(0), x.stride(1), x.stride(2), kept.stride(0), kept.stride(1))
    else:
        C, kept, block_c, n_cb = 0, None, 16, 1
        x_args = (scores, idx, 0, 0, 0, 0, 0)  # placeholders: the GATHER=False kernel never touches them
    x_ptr, kept_ptr, *x_strides = x_args
    if B:
        with device_guard(scores):
            _slot_topk_gather_kernel[(B, num_slots, n_cb)](
                scores, x_ptr, idx, kept_ptr, scores.stride(0), scores.stride(1), *x_strides[:3], idx.stride(0),
                *x_strides[3:], k, C,
                PER_SLOT=per_slot, BLOCK_P=block_p, BLOCK_J=block_j, BLOCK_C=block_c, GATHER=gather,
            )
    return idx, kept


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.seqlen = x.shape[1]
        return _gather(x, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return _scatter(grad, idx, ctx.seqlen, accumulate=True), None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, seqlen):
        ctx.save_for_backward(idx)
        return _scatter(x, idx, seqlen, accumulate=False)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return _gather(grad, idx), None, None


class _SlotTopkGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, x, num_slots, k):
        idx, kept = _slot_topk_gather(scores, x, num_slots, k)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(idx)
        ctx.seqlen = x.shape[1]
        return idx, kept

    @staticmethod
    def backward(ctx, grad_idx, grad_kept):
        (idx,) = ctx.saved_tensors
        # The kept indices are distinct, so a plain scatter is the exact adjoint of the gather.
        return None, _scatter(grad_kept, idx, ctx.seqlen, accumulate=False), None, None


def slot_topk(scores: torch.Tensor, num_slots: int, k: int) -> torch.Tensor:
    """Indices of the k highest scores in every temporal slot, ascending (see slot_topk_ref).

    Args:
        scores: (B, N) float, N = num_slots * tokens per slot (at most 1024 per slot), slot-major.
        num_slots: temporal slots.
        k: tokens kept per slot, 1 <= k <= N / num_slots.

    Returns:
        (B, num_slots * k) int64, ascending; exactly equal scores are taken lowest index first.
    """
    return _slot_topk_gather(scores.detach(), None, num_slots, k)[0]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) at idx (B, K) int32/int64 -> (B, K, C) in x's dtype; differentiable in x.

    Indices must lie in [0, N) (not checked: that would cost a device sync).
    """
    return _Gather.apply(x, idx)


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Kept tokens x (B, K, C) back to positions idx (B, K) int32/int64 in a zero (B, seqlen, C) grid.

    Returns (B, seqlen, C) in x's dtype, differentiable in x. Indices must lie in [0, seqlen).
    """
    return _Scatter.apply(x, idx, seqlen)


def slot_topk_gather(scores: torch.Tensor, x: torch.Tensor, num_slots: int, k: int):
    """Per-slot top-k of scores and the gather of the kept tokens, in one launch.

    Args:
        scores: (B, N) float (not differentiated: the selection is discrete).
        x: (B, N, C) float.
        num_slots, k: as for :func:`slot_topk`.

    Returns:
        idx (B, num_slots * k) int64 ascending, and kept (B, num_slots * k, C) in x's dtype,
        differentiable in x.
    """
    return _SlotTopkGather.apply(scores.detach(), x, num_slots, k)


def slot_topk_fwd(scores: torch.Tensor, num_slots: int, k: int) -> torch.Tensor:
    """``torch.ops.stpcore.slot_topk``: :func:`slot_topk` without autograd."""
    with device_guard(scores):
        return _slot_topk_gather(scores, None, num_slots, k)[0]


def gather_tokens_fwd(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``torch.ops.stpcore.gather_tokens``: :func:`gather_tokens` without autograd."""
    with device_guard(x):
        return _gather(x, idx)


def scatter_tokens_fwd(x: torch.Tensor, idx: torch.Tensor, seqlen: int, accumulate: bool = False) -> torch.Tensor:
    """``torch.ops.stpcore.scatter_tokens``: :func:`scatter_tokens` without autograd; ``accumulate`` sums rows
    sent to one position (the adjoint of a gather whose indices repeat)."""
    with device_guard(x):
        return _scatter(x, idx, seqlen, accumulate=accumulate)


def slot_topk_gather_fwd(scores: torch.Tensor, x: torch.Tensor, num_slots: int, k: int):
    """``torch.ops.stpcore.slot_topk_gather``: :func:`slot_topk_gather` without autograd."""
    with device_guard(x):
        return _slot_topk_gather(scores, x, num_slots, k)


def _scores_reasons(scores: torch.Tensor, num_slots: int) -> list[str]:
    reasons = []
    if scores.dtype not in _FLOATS:
        reasons.append(f"scores dtype {scores.dtype} is not a float type")
    if scores.dim() == 2 and num_slots >= 1 and scores.shape[1] // num_slots > _MAX_PER_SLOT:
        reasons.append(f"{scores.shape[1] // num_slots} tokens per slot; the kernel ranks at most {_MAX_PER_SLOT}")
    return reasons


def _rows_reasons(x: torch.Tensor, idx: torch.Tensor) -> list[str]:
    reasons = []
    if x.dtype not in _FLOATS:
        reasons.append(f"x dtype {x.dtype} is not a float type")
    if idx.dtype not in (torch.int32, torch.int64):
        reasons.append(f"idx dtype {idx.dtype} is not int32/int64")
    return reasons + interpreter_reasons(x)


# One reasons function per entry point, with its signature; devices are checked by the dispatcher.


def slot_topk_reasons(scores: torch.Tensor, num_slots: int, k: int) -> list[str]:
    """Why :func:`slot_topk` cannot run these inputs (empty: it can)."""
    return _scores_reasons(scores, num_slots) + interpreter_reasons(scores)


def gather_tokens_reasons(x: torch.Tensor, idx: torch.Tensor) -> list[str]:
    """Why :func:`gather_tokens` cannot run these inputs (empty: it can)."""
    return _rows_reasons(x, idx)


def scatter_tokens_reasons(x: torch.Tensor, idx: torch.Tensor, seqlen: int, accumulate: bool = False) -> list[str]:
    """Why :func:`scatter_tokens` cannot run these inputs (empty: it can)."""
    return _rows_reasons(x, idx)


def slot_topk_gather_reasons(scores: torch.Tensor, x: torch.Tensor, num_slots: int, k: int) -> list[str]:
    """Why :func:`slot_topk_gather` cannot run these inputs (empty: it can)."""
    reasons = _scores_reasons(scores, num_slots)
    if x.dtype not in _FLOATS:
        reasons.append(f"x dtype {x.dtype} is not a float type")
    return reasons + interpreter_reasons(scores, x)
