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
                          f"output folder, then continue from its last checkpoint (--resume OUT/last.pt), or run it "
                          f"again from the start if there is none") from error


class AgreedPass:
    """Passes over a loader outside the training steps (the lstsq decoder fit, the nullspace passes) on which the ranks
    agree before each batch, in one small all-reduce: they end on every rank at once when any rank's ``stop()`` is
    true (a signal) or any rank :meth:`fail`-ed (a bad clip), and when every rank's shard has ended (a rank whose
    shard ended first keeps agreeing, yielding nothing), so no rank reads on, or waits, for the others.
    After :meth:`batches`, ``stopped`` and ``failed`` are the same on every rank."""

    def __init__(self, info: DistInfo, device: torch.device, stop=None) -> None:
        self.info, self.device, self.stop = info, device, stop
        self.error: ValueError | None = None  # this rank's
        self.stopped = self.failed = False  # agreed

    def fail(self, error: ValueError) -> None:
        """This rank read what stops the pass (its first error is kept); every rank ends at the next batch."""
        self.error = self.error or error

    def batches(self, loader):
        """This rank's batches of one pass over ``loader``, as the ranks agree (above)."""
        if self.stopped or self.failed:
            return
        it, reading = iter(loader), True
        while True:
            batch = next(it, None) if reading and self.error is None else None
            reading = batch is not None
            signalled = self.stop is not None and bool(self.stop())
            any_reading, self.stopped, self.failed = any_rank(self.info, self.device, reading, signalled,
                                                              self.error is not None)
            if self.stopped or self.failed or not any_reading:
                return
            if batch is not None:
                yield batch


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
