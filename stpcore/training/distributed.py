"""What the ranks of a torchrun run agree on: the models' DDP wrapping, one OR over ranks per decision
(a NaN, a signal, the end of an epoch, a file rank 0 could not write), and which videos each rank trained on."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from stpcore.runtime import DistInfo


def wrap_models(models: dict[str, nn.Module], info: DistInfo, device: torch.device,
                compile: bool = False) -> dict[str, nn.Module]:
    """DDP wrappers on several ranks (the anonymizer with find_unused_parameters: each phase leaves some of its
    heads unused, and the forward skips them), then torch.compile when asked."""
    if info.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        models = {
            k: nn.parallel.DistributedDataParallel(m, device_ids=ids, find_unused_parameters=k == "anonymizer")
            for k, m in models.items()
        }
    if compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    return models


def any_rank(info: DistInfo, device: torch.device, *flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all-reduce), so that every rank takes the same branch:
    a rank that saves a checkpoint and raises alone would leave the others waiting in a collective."""
    if info.world_size == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class MainWriteFailed(OSError):
    """Rank 0 could not write one of the run's files (a full disk, a permission): raised on every rank at the same
    point (:func:`raise_write_failure`), so that none waits for rank 0 in a collective."""


def raise_write_failure(info: DistInfo, error: OSError | None, what: str | None) -> None:
    """Every rank calls it once they agreed that rank 0's write failed (``error`` and ``what``, the file meant, are
    rank 0's; None elsewhere): rank 0's message is sent to the others, and each raises MainWriteFailed with it."""
    box = [(what, str(error)) if error is not None else None]
    if info.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    what, reason = box[0]
    where = "rank 0 " if info.world_size > 1 else ""
    ranks = "; the run stopped on every rank" if info.world_size > 1 else ""
    raise MainWriteFailed(f"{where}could not write {what} ({reason}){ranks}. Free space or fix the permissions of the "
                          f"output folder, then continue from its last checkpoint (--resume OUT/last.pt; the run "
                          f"again if it has none)") from error


class PassStopped(Exception):
    """A data pass outside the training steps (the lstsq decoder fit, the privacy-nullspace passes) stopped for a
    signal, on every rank, before it changed any weight; the trainer checkpoints and stops."""


def sharding_report(info: DistInfo, seen: list[int]) -> dict:
    """Which videos each rank trained on this epoch (every rank calls it): the shards must not overlap."""
    gathered: list[list[int] | None] = [None] * info.world_size
    dist.all_gather_object(gathered, sorted(set(seen)))
    sets = [set(g or ()) for g in gathered]
    overlap = sum(len(a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    return {"videos_per_rank": [len(x) for x in sets], "videos_total": len(set().union(*sets)),
            "videos_in_two_ranks": overlap}
