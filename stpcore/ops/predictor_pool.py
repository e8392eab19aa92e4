"""Multi-level aggregation of STPrivacy's score predictor: local, per-slot and per-video features."""

from __future__ import annotations

import torch

from stpcore.ops import dispatch


def predictor_pool_ref(x: torch.Tensor, keep: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Concatenate each token's own features with masked means of its slot and of its video.

    Channels are split in thirds: the first third stays per token (local), the second is replaced by
    the keep-weighted mean over the token's temporal slot (frame), the last by the keep-weighted mean
    over the whole video (video). A slot or video with nothing kept pools to zeros.

    The guard divides by max(sum of weights, 1): for the model's 0/1 decisions that is the mean, and an empty
    slot's keep gradient is bounded, that of the mean with the token alone kept (a guard of 1e-6 made it 1e6 times
    the others', and under gradient clipping one empty slot shrank the whole step). Soft weights summing below 1
    pool to their weighted sum, between the empty slot's zero and the mean.

    Args:
        x: (B, N, C) float, C divisible by 3, N = num_slots * tokens per slot (slot-major).
        keep: (B, N) float in [0, 1], the previous cumulative decision; differentiable.
        num_slots: temporal slots.

    Returns:
        (B, N, C), differentiable in x and keep.
    """
    B, N, C = x.shape
    third = C // 3
    # The sums and means in fp32 at least, as the kernel accumulates (in fp16, a guard of 1e-6 squared underflowed
    # and an empty slot's backward became 0/0 = NaN in the gradient of x).
    out_dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))
    w = keep.to(out_dtype).to(x.dtype).unsqueeze(-1)  # (B, N, 1): the weights (and their gradient) in x's dtype
    local = x[..., :third]
    frame = (x[..., third : 2 * third] * w).reshape(B, num_slots, N // num_slots, third)
    frame_w = w.reshape(B, num_slots, N // num_slots, 1)
    frame = frame.sum(dim=2, keepdim=True) / frame_w.sum(dim=2, keepdim=True).clamp_min(1.0)  # (B, S, 1, C/3)
    frame = frame.expand(B, num_slots, N // num_slots, third).reshape(B, N, third)
    video = (x[..., 2 * third :] * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.cat([local, frame, video.expand(B, N, C - 2 * third)], dim=-1).to(out_dtype)


def _check(x, keep, num_slots):
    if x.dim() != 3 or keep.shape != x.shape[:2]:
        raise ValueError(f"predictor_pool: expected x (B, N, C) and keep (B, N); got {tuple(x.shape)}, "
                         f"{tuple(keep.shape)}")
    if x.shape[-1] % 3:
        raise ValueError(f"predictor_pool: channels C={x.shape[-1]} must be divisible by 3")
    if num_slots < 1 or x.shape[1] % num_slots:
        raise ValueError(f"predictor_pool: N={x.shape[1]} must be a positive multiple of num_slots={num_slots}")


dispatch.register("predictor_pool", dispatch.triton_backend(
    "predictor_pool", "predictor_pool_fwd", lambda x, keep, *a, **k: [x, keep], bwd="predictor_pool_bwd"))
dispatch.register("predictor_pool", dispatch.Backend("reference", predictor_pool_ref))


@torch.library.custom_op("stpcore::predictor_pool", mutates_args=())
def _op(x: torch.Tensor, keep: torch.Tensor, num_slots: int, backend: str) -> torch.Tensor:
    return dispatch.select("predictor_pool", backend or None, x, keep, num_slots).fn(x, keep, num_slots)


@_op.register_fake
def _(x, keep, num_slots, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("stpcore::predictor_pool_backward", mutates_args=())
def _backward_op(x: torch.Tensor, keep: torch.Tensor, num_slots: int, grad_out: torch.Tensor,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = dispatch.select("predictor_pool", backend or None, x, keep, num_slots)
    if chosen.bwd is not None:
        return tuple(chosen.bwd(x, keep, num_slots, grad_out))
    return tuple(dispatch.recompute_backward(dispatch.reference("predictor_pool").fn, (x, keep), (grad_out,),
                                             num_slots))


@_backward_op.register_fake
def _(x, keep, num_slots, grad_out, backend):
    return x.new_empty(x.shape), keep.new_empty(keep.shape)


def _setup_context(ctx, inputs, output):
    x, keep, num_slots, backend = inputs
    ctx.save_for_backward(x, keep)
    ctx.num_slots, ctx.backend = num_slots, backend


def _backward(ctx, grad_out):
    x, keep = ctx.saved_tensors
    dx, dkeep = torch.ops.stpcore.predictor_pool_backward(x, keep, ctx.num_slots, grad_out, ctx.backend)
    needs = ctx.needs_input_grad
    return dx if needs[0] else None, dkeep if needs[1] else None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def predictor_pool(x: torch.Tensor, keep: torch.Tensor, num_slots: int, *, backend: str | None = None) -> torch.Tensor:
    """See :func:`predictor_pool_ref`. The op is ``torch.ops.stpcore.predictor_pool(x, keep, num_slots, backend)``."""
    _check(x, keep, num_slots)
    if dispatch.direct_reference("predictor_pool", backend, x, keep, int(num_slots)):
        return predictor_pool_ref(x, keep, int(num_slots))  # plain autograd (see stpcore.ops.dispatch)
    return torch.ops.stpcore.predictor_pool(x, keep, int(num_slots), backend or "")
