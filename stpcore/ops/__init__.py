"""stpcore's functional API: the pure-PyTorch reference of every op (the spec and the CPU path) and
dispatch to the Triton kernels in ``stpcore.kernels``. Never imports models."""

from __future__ import annotations

from stpcore.ops import dispatch
from stpcore.ops.gumbel_select import gumbel_select, gumbel_select_ref, sample_gumbel
from stpcore.ops.policy_attention import policy_attention, policy_attention_chunked, policy_attention_ref
from stpcore.ops.predictor_pool import predictor_pool, predictor_pool_ref
from stpcore.ops.tokens import (
    PackedTokens,
    cu_seqlens,
    gather_tokens,
    gather_tokens_ref,
    max_seqlen,
    pack,
    scatter_tokens,
    scatter_tokens_ref,
    seq_ids,
    slot_topk,
    slot_topk_gather,
    slot_topk_gather_ref,
    slot_topk_ref,
    unpack,
)
from stpcore.ops.varlen_attention import varlen_attention, varlen_attention_ref

__all__ = [
    "PackedTokens",
    "cu_seqlens",
    "dispatch",
    "gather_tokens",
    "gather_tokens_ref",
    "gumbel_select",
    "gumbel_select_ref",
    "max_seqlen",
    "pack",
    "policy_attention",
    "policy_attention_chunked",
    "policy_attention_ref",
    "predictor_pool",
    "predictor_pool_ref",
    "sample_gumbel",
    "scatter_tokens",
    "scatter_tokens_ref",
    "seq_ids",
    "slot_topk",
    "slot_topk_gather",
    "slot_topk_gather_ref",
    "slot_topk_ref",
    "unpack",
    "varlen_attention",
    "varlen_attention_ref",
]
