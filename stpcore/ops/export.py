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
    ref = next(b for b in dispatch.backends(op) if b.name == "reference").fn

    def decomposed(*args):
        out = ref(*args[:-1])  # every op's last argument is the backend name
        if op == "slot_topk_gather":
            idx, kept = out
            return kept, idx  # the op's order
        return tuple(out) if isinstance(out, (tuple, list)) else out

    decomposed.__name__ = f"{op}_decomposed"
    return decomposed


def decompositions() -> dict:
    """{``torch.ops.stpcore.<op>.default``: its reference} for every op (forwards; their backwards are ops of
    their own and not needed to export inference)."""
    return {getattr(torch.ops.stpcore, op).default: _reference(op) for op in dispatch.ops()}
