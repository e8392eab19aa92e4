"""Kept-token bookkeeping: per-slot top-k, gather/scatter, and packed (varlen) layouts.

Tokens are t-major: a clip's N tokens are ``num_slots`` temporal slots of N / num_slots spatial
positions each. Kept sets are returned in ascending original order, so after a gather every slot's
tokens stay contiguous and slot-major (attention and the masked means do not depend on order, and
positions travel with the tokens).

Variable (per-video) kept sets use flash-attention's varlen convention: packed rows (total, ...),
``cu_seqlens`` int32 (B + 1,) with cu_seqlens[b] the first row of video b, and ``max_seqlen`` an int.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stpcore.ops import dispatch


def _check_slots(name: str, n: int, num_slots: int, k: int | None = None) -> int:
    if num_slots < 1 or n % num_slots:
        raise ValueError(f"{name}: the sequence length {n} must be a positive multiple of num_slots={num_slots}")
    per_slot = n // num_slots
    if k is not None and not 1 <= k <= per_slot:
        raise ValueError(f"{name}: k must be in [1, {per_slot}] (tokens per slot), got k={k}")
    return per_slot


def slot_topk_ref(scores: torch.Tensor, num_slots: int, k: int) -> torch.Tensor:
    """Indices of the k highest scores in every temporal slot, ascending.

    Args:
        scores: (B, N) float, N = num_slots * tokens per slot, slot-major.
        num_slots: number of temporal slots.
        k: tokens kept per slot.

    Returns:
        (B, num_slots * k) int64 indices into the N tokens, ascending. Equal scores are taken lowest index
        first and NaN counts as the highest score (a stable descending sort), so the choice is deterministic
        and the same as the Triton kernel's (torch.topk may pick any of equal scores).
    """
    B, N = scores.shape
    per_slot = _check_slots("slot_topk", N, num_slots, k)
    order = scores.reshape(B, num_slots, per_slot).sort(dim=-1, descending=True, stable=True).indices
    top = order[..., :k].sort(dim=-1).values  # (B, S, k)
    offsets = torch.arange(num_slots, device=scores.device).reshape(1, num_slots, 1) * per_slot
    return (top + offsets).reshape(B, num_slots * k)


def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B, K) int64 -> (B, K, C); differentiable in x."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_ref(x: torch.Tensor, idx: torch.Tensor, seqlen: int) -> torch.Tensor:
    """x (B, K, C) kept tokens, idx (B, K) int64 -> (B, seqlen, C), zeros where nothing was kept."""
    out = x.new_zeros(x.shape[0], seqlen, x.shape[-1])
    return out.scatter(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)


def slot_topk_gather_ref(scores: torch.Tensor, x: torch.Tensor, num_slots: int, k: int):
    """Per-slot top-k and the gather of the kept tokens: (idx (B, S*k) int64, kept (B, S*k, C))."""
    idx = slot_topk_ref(scores, num_slots, k)
    return idx, gather_tokens_ref(x, idx)


def _check_idx(name, x, idx):
    if x.dim() != 3 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: expected x (B, N, C) and idx (B, K); got {tuple(x.shape)} and {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: idx must be an integer tensor, got {idx.dtype}")


def _scatter_ref(x: torch.Tensor, idx: torch.Tensor, seqlen: int, accumulate: bool = False) -> torch.Tensor:
    """:func:`scatter_tokens_ref`, or with ``accumulate`` the sum of the rows sent to one position (the adjoint
    of :func:`gather_tokens_ref`, whose indices may repeat)."""
    if not accumulate:
        return scatter_tokens_ref(x, idx, seqlen)
    out = x.new_zeros(x.shape[0], seqlen, x.shape[-1])
    return out.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)


def _register_ref_and_triton(op, ref, tensors):
    """The reference and the kernel of ``op`` in stpcore.kernels.tokens (``<op>_fwd``, ``<op>_reasons``)."""
    dispatch.register(op, dispatch.triton_backend("tokens", f"{op}_fwd", tensors, reasons=f"{op}_reasons"))
    dispatch.register(op, dispatch.Backend("reference", ref))


_register_ref_and_triton("slot_topk", slot_topk_ref, lambda s, *a, **k: [s])
_register_ref_and_triton("gather_tokens", gather_tokens_ref, lambda x, i, *a, **k: [x, i])
_register_ref_and_triton("scatter_tokens", _scatter_ref, lambda x, i, *a, **k: [x, i])
_register_ref_and_triton("slot_topk_gather", slot_topk_gather_ref, lambda s, x, *a, **k: [s, x])


# The ops as torch sees them. The backward of a gather is an accumulating scatter, of a scatter a gather,
# of the top-k gather a plain scatter (its indices are distinct): each a call of the other op.
@torch.library.custom_op("stpcore::slot_topk", mutates_args=())
def _slot_topk_op(scores: torch.Tensor, num_slots: int, k: int, backend: str) -> torch.Tensor:
    return dispatch.select("slot_topk", backend or None, scores, num_slots, k).fn(scores, num_slots, k)


@_slot_topk_op.register_fake
def _(scores, num_slots, k, backend):
    return scores.new_empty(scores.shape[0], num_slots * k, dtype=torch.int64)


@torch.library.custom_op("stpcore::gather_tokens", mutates_args=())
def _gather_op(x: torch.Tensor, idx: torch.Tensor, backend: str) -> torch.Tensor:
    return dispatch.select("gather_tokens", backend or None, x, idx).fn(x, idx)


@_gather_op.register_fake
def _(x, idx, backend):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[-1])


def _gather_setup(ctx, inputs, output):
    x, idx, backend = inputs
    ctx.save_for_backward(idx)
    ctx.seqlen, ctx.backend = x.shape[1], backend


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return torch.ops.stpcore.scatter_tokens(grad, idx, ctx.seqlen, True, ctx.backend), None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("stpcore::scatter_tokens", mutates_args=())
def _scatter_op(x: torch.Tensor, idx: torch.Tensor, seqlen: int, accumulate: bool, backend: str) -> torch.Tensor:
    chosen = dispatch.select("scatter_tokens", backend or None, x, idx, seqlen, accumulate=accumulate)
    return chosen.fn(x, idx, seqlen, accumulate)


@_scatter_op.register_fake
def _(x, idx, seqlen, accumulate, backend):
    return x.new_empty(x.shape[0], seqlen, x.shape[-1])


def _scatter_setup(ctx, inputs, output):
    x, idx, seqlen, accumulate, backend = inputs
    ctx.save_for_backward(idx)
    ctx.backend = backend


def _scatter_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return torch.ops.stpcore.gather_tokens(grad, idx, ctx.backend), None, None, None, None


_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


@torch.library.custom_op("stpcore::slot_topk_gather", mutates_args=())
def _slot_topk_gather_op(scores: torch.Tensor, x: torch.Tensor, num_slots: int, k: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (kept (B, S*k, C), idx (B, S*k) int64)."""
    chosen = dispatch.select("slot_topk_gather", backend or None, scores, x, num_slots, k)
    idx, kept = chosen.fn(scores, x, num_slots, k)
    return kept, idx  # the float output first: opcheck's harness sums the outputs into the first one's dtype


@_slot_topk_gather_op.register_fake
def _(scores, x, num_slots, k, backend):
    B = x.shape[0]
    return x.new_empty(B, num_slots * k, x.shape[-1]), x.new_empty(B, num_slots * k, dtype=torch.int64)


def _slot_topk_gather_setup(ctx, inputs, output):
    scores, x, num_slots, k, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.seqlen, ctx.backend = x.shape[1], backend


def _slot_topk_gather_backward(ctx, grad_kept, _grad_idx):
    (idx,) = ctx.saved_tensors
    return None, torch.ops.stpcore.scatter_tokens(grad_kept, idx, ctx.seqlen, False, ctx.backend), None, None, None


_slot_topk_gather_op.register_autograd(_slot_topk_gather_backward, setup_context=_slot_topk_gather_setup)


def slot_topk(scores: torch.Tensor, num_slots: int, k: int, *, backend: str | None = None) -> torch.Tensor:
    """Kept token indices per video, the same k in every temporal slot (see :func:`slot_topk_ref`)."""
    if scores.dim() != 2:
        raise ValueError(f"slot_topk: scores must be (B, N), got {tuple(scores.shape)}")
    _check_slots("slot_topk", scores.shape[1], num_slots, k)
    return torch.ops.stpcore.slot_topk(scores.detach(), int(num_slots), int(k), backend or "")


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The tokens of x (B, N, C) at idx (B, K): (B, K, C)."""
    _check_idx("gather_tokens", x, idx)
    return torch.ops.stpcore.gather_tokens(x, idx, backend or "")


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, seqlen: int, *, backend: str | None = None) -> torch.Tensor:
    """Kept tokens x (B, K, C) back to their positions idx (B, K) in a zero (B, seqlen, C) grid."""
    _check_idx("scatter_tokens", x, idx)
    if idx.shape[1] != x.shape[1] or seqlen < x.shape[1]:
        raise ValueError(f"scatter_tokens: idx {tuple(idx.shape)} must match x {tuple(x.shape)}, seqlen >= K")
    return torch.ops.stpcore.scatter_tokens(x, idx, int(seqlen), False, backend or "")


def slot_topk_gather(scores: torch.Tensor, x: torch.Tensor, num_slots: int, k: int, *, backend: str | None = None):
    """Per-slot top-k of scores (B, N) and gather of x (B, N, C): (idx (B, S*k), kept (B, S*k, C))."""
    if scores.shape != x.shape[:2]:
        raise ValueError(f"slot_topk_gather: scores {tuple(scores.shape)} must be x's (B, N) {tuple(x.shape[:2])}")
    _check_slots("slot_topk_gather", scores.shape[1], num_slots, k)
    kept, idx = torch.ops.stpcore.slot_topk_gather(scores.detach(), x, int(num_slots), int(k), backend or "")
    return idx, kept


class PackedTokens(NamedTuple):
    """Variable-length kept sets, packed.

    values: (total, ...) the kept rows, video after video, each in ascending original order.
    indices: (total,) int64 flat positions b * N + n in the (B, N) grid.
    cu_seqlens: (B + 1,) int32 cumulative lengths.
    max_seqlen: longest kept set, or an upper bound of it (``pack(..., seqlen_bound=...)``).
    """

    values: torch.Tensor
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) integer lengths -> (B + 1,) int32 cumulative offsets starting at 0."""
    if lengths.dim() != 1:
        raise ValueError(f"cu_seqlens: lengths must be (B,), got {tuple(lengths.shape)}")
    out = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = lengths.cumsum(0)
    return out


def max_seqlen(cu: torch.Tensor) -> int:
    """Longest sequence of a cu_seqlens vector (a host sync on CUDA)."""
    return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0


def pack(x: torch.Tensor, keep_mask: torch.Tensor, seqlen_bound: int | None = None) -> PackedTokens:
    """Pack the kept tokens of x (B, N, ...) where keep_mask (B, N) is nonzero.

    The packed size is data-dependent: finding it (``nonzero``) is a host sync on CUDA. ``seqlen_bound`` given
    (an upper bound of every kept set, e.g. N) becomes ``max_seqlen`` and saves a second sync; None computes
    the exact longest set."""
    if keep_mask.shape != x.shape[:2]:
        raise ValueError(f"pack: keep_mask must be x's (B, N) {tuple(x.shape[:2])}, got {tuple(keep_mask.shape)}")
    B, N = keep_mask.shape
    flat = keep_mask.reshape(-1) != 0
    indices = flat.nonzero().squeeze(-1)  # ascending: video-major, original order inside a video
    cu = cu_seqlens((keep_mask != 0).sum(dim=1))
    values = x.reshape(B * N, *x.shape[2:]).index_select(0, indices)
    return PackedTokens(values, indices, cu, max_seqlen(cu) if seqlen_bound is None else int(seqlen_bound))


def unpack(values: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (total, ...) rows back into a zero (batch, seqlen, ...) grid."""
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"unpack: {values.shape[0]} rows but {indices.shape[0]} indices")
    out = values.new_zeros(batch * seqlen, *values.shape[1:])
    out = out.index_copy(0, indices, values)
    return out.reshape(batch, seqlen, *values.shape[1:])


def seq_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64 sequence number of every packed row."""
    return torch.searchsorted(cu[1:].to(torch.int64), torch.arange(total, device=cu.device), right=True)
