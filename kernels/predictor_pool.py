"""STPrivacy's predictor aggregation (local / per-slot mean / per-video mean channel thirds), in Triton.

One launch over the grid (B, 3 channel thirds, channel blocks): a program owns BLOCK_C channels of one
third of one video. The local third is a copy; the frame third is, for every slot, a keep-weighted sum
over the slot's tokens followed by a broadcast store of the mean; the video third is the same with the
whole video as the one group. Every element of x is read once and every element of out written once
(plus the (B, N) keep weights once per program), so the forward moves 2 * B * N * C elements.

Backward (grads to x and keep), for a group G with weights w, sums W = sum w, Wc = max(W, 1) (the reference's
guard: the mean for 0/1 weights, a bounded gradient for an empty group), numerator S = sum w x, mean F = S / Wc
and summed output gradient g = sum_{n in G} dout_n:
    dx_m = w_m g / Wc
    dw_m = <g, x_m> / Wc - [W >= 1] <g, F> / Wc        (clamp_min passes its gradient where W >= min)
Each program writes its channel block's partial dot products to a (B, 2 * channel blocks, N) fp32 buffer,
summed on the host (deterministic: no atomics).

Loop bounds (N, slots) are compile-time constants: one specialisation per model shape, and Triton 3.6's
interpreter cannot run loops with runtime bounds under NumPy 2.4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stpcore.kernels._launch import DTYPES, device_guard, interpreter_reasons

_EPS = 1.0  # the reference's clamp_min on the weight sums
_BLOCK_C = 32


@triton.jit
def _pool_group_fwd(x_ptr, w_ptr, out_ptr, stride_xn, stride_wn, stride_on, ch, c_mask, first,
                    GROUP_LEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EPS: tl.constexpr):
    """Keep-weighted mean of rows [first, first + GROUP_LEN) at channels ch, stored back to every row."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    w_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, GROUP_LEN, BLOCK_N):
        r = n0 + tl.arange(0, BLOCK_N)
        n = (first + r).to(tl.int64)
        n_mask = r < GROUP_LEN
        # The reference weights with keep cast to x's dtype.
        w = tl.load(w_ptr + n * stride_wn, mask=n_mask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        xv = tl.load(x_ptr + n[:, None] * stride_xn + ch[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        acc += xv.to(tl.float32) * w[:, None]
        w_acc += w
    mean = tl.sum(acc, axis=0) / tl.maximum(tl.sum(w_acc, axis=0), EPS)  # (BLOCK_C,)
    for n0 in range(0, GROUP_LEN, BLOCK_N):
        r = n0 + tl.arange(0, BLOCK_N)
        n = (first + r).to(tl.int64)
        m = (r < GROUP_LEN)[:, None] & c_mask[None, :]
        val = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32) + mean[None, :]
        tl.store(out_ptr + n[:, None] * stride_on + ch[None, :], val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pool_group_bwd(x_ptr, w_ptr, dout_ptr, dx_ptr, dw_ptr, stride_xn, stride_wn, stride_on, ch, c_mask, first,
                    GROUP_LEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EPS: tl.constexpr):
    """dx at channels ch and this block's partial dw for rows [first, first + GROUP_LEN) (see module doc)."""
    g_acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    s_acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    w_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for n0 in range(0, GROUP_LEN, BLOCK_N):
        r = n0 + tl.arange(0, BLOCK_N)
        n = (first + r).to(tl.int64)
        n_mask = r < GROUP_LEN
        m = n_mask[:, None] & c_mask[None, :]
        w = tl.load(w_ptr + n * stride_wn, mask=n_mask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        xv = tl.load(x_ptr + n[:, None] * stride_xn + ch[None, :], mask=m, other=0.0).to(tl.float32)
        g_acc += tl.load(dout_ptr + n[:, None] * stride_on + ch[None, :], mask=m, other=0.0).to(tl.float32)
        s_acc += xv * w[:, None]
        w_acc += w
    g = tl.sum(g_acc, axis=0)  # (BLOCK_C,) summed output gradient of the group
    w_sum = tl.sum(w_acc, axis=0)
    w_c = tl.maximum(w_sum, EPS)
    mean = tl.sum(s_acc, axis=0) / w_c
    through = tl.where(w_sum >= EPS, tl.sum(g * mean, axis=0) / w_c, 0.0)
    for n0 in range(0, GROUP_LEN, BLOCK_N):
        r = n0 + tl.arange(0, BLOCK_N)
        n = (first + r).to(tl.int64)
        n_mask = r < GROUP_LEN
        m = n_mask[:, None] & c_mask[None, :]
        w = tl.load(w_ptr + n * stride_wn, mask=n_mask, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        xv = tl.load(x_ptr + n[:, None] * stride_xn + ch[None, :], mask=m, other=0.0).to(tl.float32)
        dx = w[:, None] * g[None, :] / w_c
        tl.store(dx_ptr + n[:, None] * stride_on + ch[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dw_ptr + n, tl.sum(xv * g[None, :], axis=1) / w_c - through, mask=n_mask)


@triton.jit
def _predictor_pool_fwd_kernel(
    x_ptr, keep_ptr, out_ptr,
    stride_xb, stride_xn, stride_kb, stride_kn, stride_ob, stride_on,
    third,
    N: tl.constexpr, NUM_SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, EPS: tl.constexpr,
):
    # x's channel stride must be 1 (checked by the launcher); out is contiguous.
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)  # 0 local, 1 frame (per slot), 2 video
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < third
    ch = part * third + c
    x_b = x_ptr + b * stride_xb
    w_b = keep_ptr + b * stride_kb
    o_b = out_ptr + b * stride_ob
    if part == 0:
        for n0 in range(0, N, BLOCK_V):
            n = (n0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            m = (n < N)[:, None] & c_mask[None, :]
            v = tl.load(x_b + n[:, None] * stride_xn + ch[None, :], mask=m)
            tl.store(o_b + n[:, None] * stride_on + ch[None, :], v.to(out_ptr.dtype.element_ty), mask=m)
    elif part == 1:
        for s in range(NUM_SLOTS):
            _pool_group_fwd(x_b, w_b, o_b, stride_xn, stride_kn, stride_on, ch, c_mask, s * (N // NUM_SLOTS),
                            N // NUM_SLOTS, BLOCK_S, BLOCK_C, EPS)
    else:
        _pool_group_fwd(x_b, w_b, o_b, stride_xn, stride_kn, stride_on, ch, c_mask, 0, N, BLOCK_V, BLOCK_C, EPS)


@triton.jit
def _predictor_pool_bwd_kernel(
    x_ptr, keep_ptr, dout_ptr, dx_ptr, dw_ptr,
    stride_xb, stride_xn, stride_kb, stride_kn, stride_ob, stride_on, stride_wb, stride_wp,
    third,
    N: tl.constexpr, NUM_SLOTS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, EPS: tl.constexpr,
):
    # dout and dx are contiguous (B, N, C); dw is the (B, 2 * channel blocks, N) partial buffer.
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    cb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < third
    ch = part * third + c
    x_b = x_ptr + b * stride_xb
    w_b = keep_ptr + b * stride_kb
    g_b = dout_ptr + b * stride_ob
    dx_b = dx_ptr + b * stride_ob
    dw_b = dw_ptr + b * stride_wb + ((part - 1) * tl.num_programs(2) + cb).to(tl.int64) * stride_wp
    if part == 0:
        for n0 in range(0, N, BLOCK_V):
            n = (n0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            m = (n < N)[:, None] & c_mask[None, :]
            v = tl.load(g_b + n[:, None] * stride_on + ch[None, :], mask=m)
            tl.store(dx_b + n[:, None] * stride_on + ch[None, :], v, mask=m)
    elif part == 1:
        for s in range(NUM_SLOTS):
            _pool_group_bwd(x_b, w_b, g_b, dx_b, dw_b, stride_xn, stride_kn, stride_on, ch, c_mask,
                            s * (N // NUM_SLOTS), N // NUM_SLOTS, BLOCK_S, BLOCK_C, EPS)
    else:
        _pool_group_bwd(x_b, w_b, g_b, dx_b, dw_b, stride_xn, stride_kn, stride_on, ch, c_mask, 0, N, BLOCK_V,
                        BLOCK_C, EPS)


def _blocks(N: int, num_slots: int, third: int) -> tuple[int, int, int]:
    block_c = min(_BLOCK_C, triton.next_power_of_2(max(third, 1)))
    block_s = min(64, triton.next_power_of_2(N // num_slots))
    block_v = min(64, triton.next_power_of_2(N))
    return block_s, block_v, block_c


def _forward(x: torch.Tensor, keep: torch.Tensor, num_slots: int) -> torch.Tensor:
    B, N, C = x.shape
    third = C // 3
    out = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    if out.numel():
        block_s, block_v, block_c = _blocks(N, num_slots, third)
        _predictor_pool_fwd_kernel[(B, 3, triton.cdiv(third, block_c))](
            x, keep, out, x.stride(0), x.stride(1), keep.stride(0), keep.stride(1), out.stride(0), out.stride(1),
            third, N=N, NUM_SLOTS=num_slots, BLOCK_S=block_s, BLOCK_V=block_v, BLOCK_C=block_c, EPS=_EPS,
        )
    return out


def _backward(x: torch.Tensor, keep: torch.Tensor, grad_out: torch.Tensor, num_slots: int):
    B, N, C = x.shape
    third = C // 3
    dx = torch.empty(B, N, C, device=x.device, dtype=x.dtype)
    block_s, block_v, block_c = _blocks(N, num_slots, third)
    n_cb = triton.cdiv(third, block_c)
    partial = torch.empty(B, 2 * n_cb, N, device=x.device, dtype=torch.float32)  # (B, frame+video blocks, N)
    if dx.numel():
        _predictor_pool_bwd_kernel[(B, 3, n_cb)](
            x, keep, grad_out, dx, partial,
            x.stride(0), x.stride(1), keep.stride(0), keep.stride(1), grad_out.stride(0), grad_out.stride(1),
            partial.stride(0), partial.stride(1),
            third, N=N, NUM_SLOTS=num_slots, BLOCK_S=block_s, BLOCK_V=block_v, BLOCK_C=block_c, EPS=_EPS,
        )
    # The reference differentiates keep through keep.to(x.dtype): its gradient is rounded to x's dtype.
    dkeep = partial.sum(dim=1).to(x.dtype).to(keep.dtype)  # (B, N)
    return dx, dkeep


class _PredictorPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, num_slots):
        ctx.save_for_backward(x, keep)
        ctx.num_slots = num_slots
        with device_guard(x):
            return _forward(x, keep, num_slots)

    @staticmethod
    def backward(ctx, grad_out):
        x, keep = ctx.saved_tensors
        with device_guard(x):
            dx, dkeep = _backward(x, keep, grad_out.contiguous(), ctx.num_slots)
        return (dx if ctx.needs_input_grad[0] else None, dkeep if ctx.needs_input_grad[1] else None, None)


def predictor_pool(x: torch.Tensor, keep: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Local / per-slot / per-video channel thirds; see :func:`stpcore.ops.predictor_pool_ref`.

    Args:
        x: (B, N, C) fp16/bf16/fp32, C divisible by 3, N = num_slots * tokens per slot (slot-major).
        keep: (B, N) float in [0, 1], the previous cumulative decision (any float dtype).
        num_slots: temporal slots.

    Returns:
        (B, N, C) in x's dtype, differentiable in x and keep (keep's gradient in keep's dtype).
    """
    if x.stride(-1) != 1:
        x = x.contiguous()  # the kernels address channels with unit stride
    return _PredictorPool.apply(x, keep, num_slots)


def predictor_pool_fwd(x: torch.Tensor, keep: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The forward of ``torch.ops.stpcore.predictor_pool``."""
    with device_guard(x):
        return _forward(x.contiguous() if x.stride(-1) != 1 else x, keep, num_slots)


def predictor_pool_bwd(x: torch.Tensor, keep: torch.Tensor, num_slots: int, grad_out: torch.Tensor):
    """The backward of ``torch.ops.stpcore.predictor_pool``: (dx, dkeep)."""
    with device_guard(x):
        return _backward(x.contiguous() if x.stride(-1) != 1 else x, keep, grad_out.contiguous(), num_slots)


def not_supported_reasons(x: torch.Tensor, keep: torch.Tensor, num_slots: int) -> list[str]:
    """Why the kernel cannot run these inputs (empty: it can); devices are checked by the dispatcher."""
    reasons = []
    if x.dtype not in DTYPES:
        reasons.append(f"x dtype {x.dtype} is not one of fp16/bf16/fp32")
    if not keep.is_floating_point():
        reasons.append(f"keep must be a float tensor, got {keep.dtype}")
    return reasons + interpreter_reasons(x, keep)
