"""Decompositions of stpcore's custom ops into standard aten ops, for ``torch.export`` and ONNX.

``torch.ops.stpcore.<op>`` is opaque to an exporter. :func:`decompositions` maps each op to its reference
backend (plain PyTorch), so that ::

    ep = torch.export.export(module, (clips,)).run_decompositions(stpcore.ops.export.decompositions())

leaves a graph of aten ops only, which ``torch.onnx.export(ep, ...)`` (or any aten-level consumer) can
translate. The references are the specification, so the decomposed graph computes what the kernels compute.
The eval (top-k) forward of STPrivacy decomposes into ops an exporter handles; the adaptive mode's packed
sets have data-dependent sizes and the varlen reference loops over them on the host, so that mode does not
export.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stpcore.ops import dispatch


def _reference(op: str) -> Callable:
    ref = dispatch.reference(op).fn

    def decomposed(*args):
        out = ref(*args[:-1])  # every op's last argument is the backend name
        if op == "slot_topk_gather":
            idx, kept = out
            return kept, idx  # the op's order
        return tuple(out) if isinstance(out, (tuple, list)) else out

    decomposed.__name__ = f"{op}_decomposed"
    return decomposed


def _slot_topk_by_topk(scores: torch.Tensor, num_slots: int, k: int) -> torch.Tensor:
    """Per-slot top-k with ``topk`` instead of the reference's stable sort, which ONNX has no operator for: the
    same indices wherever the k-th and (k+1)-th scores of a slot differ. ONNX's TopK takes equal scores lowest
    index first, as the reference does (measured with ONNX Runtime and OpenVINO); torch's own ``topk`` on CPU
    does not promise that, so run eagerly this function may break ties differently; NaN scores may be ranked
    differently too."""
    B, N = scores.shape
    per_slot = N // num_slots
    top = scores.reshape(B, num_slots, per_slot).topk(k, dim=-1).indices  # (B, S, k)
    top = -(-top).topk(k, dim=-1).values  # ascending
    offsets = torch.arange(num_slots, device=scores.device).reshape(1, num_slots, 1) * per_slot
    return (top + offsets).reshape(B, num_slots * k)


def decompositions(onnx: bool = False) -> dict:
    """{``torch.ops.stpcore.<op>.default``: its reference} for every op (forwards; their backwards are ops of
    their own and not needed to export inference). ``onnx``: the per-slot top-k by ``topk`` rather than by a
    stable sort (:func:`_slot_topk_by_topk`), for exporters without a stable sort."""
    table = {getattr(torch.ops.stpcore, op).default: _reference(op) for op in dispatch.ops()}
    if onnx:
        from stpcore.ops.tokens import gather_tokens_ref

        def slot_topk_gather(scores, x, num_slots, k, backend):
            idx = _slot_topk_by_topk(scores, num_slots, k)
            return gather_tokens_ref(x, idx), idx

        table[torch.ops.stpcore.slot_topk.default] = lambda scores, num_slots, k, backend: _slot_topk_by_topk(
            scores, num_slots, k)
        table[torch.ops.stpcore.slot_topk_gather.default] = slot_topk_gather
    return table
