"""One rank of a 2-process gloo training run for tests/training/test_distributed.py (run under torch.distributed.run).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/training/ddp_worker.py SCENARIO OUT_DIR

Scenarios: "nan_on_rank1" (rank 1's second batch overflows inside the model), "short_rank1" (rank 1's loader
has one batch fewer per epoch), "signal_on_rank1" (only rank 1 gets SIGTERM, after its second batch),
"unsynced" (the trainer's steps call the bare models instead of their DistributedDataParallel wrappers, so
gradients are not averaged: the control that shows the ranks' data differ enough to tell), "adversaries" (issue
16's phase-2 options on: two ViT adversaries, the statistics adversary, replay, two adversary steps, noise, colour
spread), "report" (both ranks count a missing split entry at the start, rank 1 an unreadable video per
epoch), "lstsq_inf_on_rank1" / "lstsq_signal_on_rank1" / "lstsq_short_rank1" (decoder_init="lstsq": rank 1 reads
an Inf clip, or gets SIGTERM, during the decoder fit's pass, or has one batch fewer), "disk_full_on_rank0" /
"log_fails_on_rank0" (rank 0 cannot write its checkpoint, or its metrics log from the second step on), "nullspace"
(privacy_nullspace=2 at the end of phase 2; each rank also fits the probes on planted features of its own and on both
ranks' together, alone: "nullspace_matches_single" says whether the two-rank fit equals it).
Each rank writes OUT_DIR/rank<r>.json: {"outcome": "...", "message": ..., "steps": ..., "clip_sums": [...]}
(clip_sums: the float64 sum of every batch its loader yielded), and OUT_DIR/rank<r>.pt: {"initial": {name: tensor},
"final": {name: tensor}}, the parameters of every model before and after fit().
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stpcore.data import DataReport
from stpcore.testing import RandomClipLoader
from stpcore.training import TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted


class _Loader(RandomClipLoader):
    def __init__(self, scenario: str, rank: int) -> None:
        super().__init__(num_batches=3, batch_size=2, num_frames=8, size=32, seed=rank)  # each rank its own data
        self.scenario, self.rank, self.trainer = scenario, rank, None
        self.clip_sums: list[float] = []
        if scenario == "report":  # a data report: both ranks count a missing split entry, rank 1 an unreadable video
            self._report = DataReport()
            self._report.add("missing file (split entry)", "class/gone.*")
            self._report.shared = dict(self._report.counts)
            self.report = lambda: self._report

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if self.rank == 1 and self.scenario in ("short_rank1", "lstsq_short_rank1") and i == 2:
                return
            if self.rank == 1 and self.scenario == "nan_on_rank1" and i == 1:
                batch.clips *= 1e30  # finite input that overflows inside the model
            fitting = self.trainer.phase == "phase2" and self.trainer.step_in_epoch == 0  # the lstsq fit's pass
            if self.rank == 1 and self.scenario == "lstsq_inf_on_rank1" and fitting and i == 1:
                batch.clips[0, 0, 0, 0, 0] = float("inf")
            if self.scenario == "report" and self.rank == 1 and i == 0:
                self._report.add("unreadable", f"class/bad{self.epoch}.avi")
            self.clip_sums.append(batch.clips.double().sum().item())
            batch.order_end = 100 * self.rank + 2 * (i + 1)  # how far this rank's loader read: its own
            yield batch
            if self.rank == 1 and self.scenario == "signal_on_rank1" and i == 1 and self.trainer.epoch == 0:
                self.trainer._stop_signal = 15  # what the SIGTERM handler does, on this rank only
            if self.rank == 1 and self.scenario == "lstsq_signal_on_rank1" and fitting and i == 0:
                self.trainer._stop_signal = 15


def _parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    from stpcore.runtime import unwrap

    models = {"anonymizer": trainer.anonymizer, "action": trainer.action_rec, "privacy": trainer.privacy_rec}
    models.update({k: unwrap(m) for k, m in trainer.models.items() if k not in models})  # issue 16's adversaries
    return {f"{k}.{n}": p.detach().clone() for k, m in models.items() for n, p in m.named_parameters()}


def _planted(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    labels = torch.randint(0, 2, (400 + 100 * rank, 3), generator=g).double()  # shards of different sizes
    features = torch.randn(labels.shape[0], 7, generator=g, dtype=torch.float64)
    features[:, :3] += 2.0 * labels
    return features, labels


def _nullspace_matches_single(info) -> bool:
    """The two-rank privacy_nullspace (each rank its own rows) equals one process's fit on all the rows."""
    from stpcore.runtime import DistInfo
    from stpcore.training.nullspace import privacy_nullspace

    both, both_acc, _ = privacy_nullspace(*_planted(info.rank), rounds=2, info=info)
    shards = [_planted(r) for r in range(info.world_size)]
    alone, alone_acc, _ = privacy_nullspace(torch.cat([f for f, _ in shards]), torch.cat([lab for _, lab in shards]),
                                            rounds=2, info=DistInfo())
    rows = sum(len(lab) for _, lab in shards)
    same_accuracy = all(abs(a - b) <= 2 / rows for ra, rb in zip(both_acc, alone_acc, strict=True)
                        for a, b in zip(ra, rb, strict=True))  # a row on the boundary may flip with the sum order
    return bool(torch.allclose(both, alone, atol=1e-8)) and same_accuracy


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    options = dict(privacy_adversaries=2, stats_adversary_weight=1.0, privacy_replay=2, privacy_steps=2,
                   adversary_noise=0.1, colour_spread_weight=1.0) if scenario == "adversaries" else {}
    if scenario == "nullspace":
        options = dict(privacy_nullspace=2)
    if scenario.startswith("lstsq_"):
        options = dict(decoder_init="lstsq")
    cfg = TrainConfig(data_root="unused", out_dir=str(out / "run"), preset="tiny", batch_size=2, phase1_epochs=1,
                      phase2_epochs=1, progress=False, checkpoint_every=0, base_lr=0.2, warmup_epochs=0.5, **options)
    loader = _Loader(scenario, rank)
    trainer = Trainer(cfg, loader)
    loader.trainer = trainer
    if scenario == "unsynced":
        trainer.models = {"anonymizer": trainer.anonymizer, "action": trainer.action_rec,
                          "privacy": trainer.privacy_rec}
    initial = _parameters(trainer)
    if rank == 0 and scenario == "disk_full_on_rank0":  # rank 0's first checkpoint (end of phase 1) goes to a full disk
        import contextlib

        from stpcore.models import checkpoints

        @contextlib.contextmanager
        def full(path):
            yield Path("/dev/full")  # every write there fails with ENOSPC: torch.save's own error path runs

        checkpoints.atomic_path = full  # what checkpoints and exports are written through (save_atomically)
    if rank == 0 and scenario == "log_fails_on_rank0":  # rank 0 cannot append to metrics.jsonl from its 2nd step on
        import errno

        def full_log(record):
            if record.get("step", 0) >= 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(out / "run" / "metrics.jsonl"))

        trainer._append_metrics = full_log
    try:
        trainer.fit()
        result = {"outcome": "finished"}
    except TrainingDiverged as exc:
        result = {"outcome": "diverged", "message": str(exc)}
    except TrainingInterrupted as exc:
        result = {"outcome": "interrupted", "message": str(exc)}
    except ValueError as exc:  # bad data, raised on every rank
        result = {"outcome": "error", "message": str(exc)}
    except OSError as exc:  # a file rank 0 could not write, raised on every rank
        result = {"outcome": "file error", "message": str(exc)}
    result["steps"] = trainer.global_step
    result["clip_sums"] = loader.clip_sums
    if scenario == "adversaries":  # a resume restores this rank's own replay buffer, not rank 0's
        twin = Trainer(cfg, _Loader(scenario, rank))
        twin.load_checkpoint(out / "run" / "last.pt")
        result["replay_restored"] = len(twin.replay) == len(trainer.replay) > 0 and all(
            torch.equal(a[k], b[k]) for a, b in zip(twin.replay, trainer.replay, strict=True) for k in a)
        result["replay_sum"] = float(sum(e["video"].double().sum() for e in trainer.replay))
    if scenario == "nullspace":
        result["nullspace_matches_single"] = _nullspace_matches_single(trainer.dist)
    torch.save({"initial": initial, "final": _parameters(trainer)}, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    # Leave together: a rank that exits while its peer still talks to it over the gloo sockets can take the
    # peer down at exit. The barrier is the last message; destroying the group then closes every connection.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
