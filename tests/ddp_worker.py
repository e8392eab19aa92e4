"""One rank of a 2-process gloo training run for tests/test_train_ddp.py (run under torch.distributed.run).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py SCENARIO OUT_DIR

Scenarios: "nan_on_rank1" (rank 1's second batch overflows inside the model), "short_rank1" (rank 1's loader
has one batch fewer per epoch), "signal_on_rank1" (only rank 1 gets SIGTERM, after its second batch).
Each rank writes OUT_DIR/rank<r>.json: {"outcome": "...", "message": ..., "steps": ...}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from stpcore.testing import RandomClipLoader
from stpcore.train import TrainConfig, Trainer, TrainingDiverged, TrainingInterrupted


class _Loader(RandomClipLoader):
    def __init__(self, scenario: str, rank: int) -> None:
        super().__init__(num_batches=3, batch_size=2, num_frames=8, size=32, seed=rank)
        self.scenario, self.rank, self.trainer = scenario, rank, None

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if self.rank == 1 and self.scenario == "short_rank1" and i == 2:
                return
            if self.rank == 1 and self.scenario == "nan_on_rank1" and i == 1:
                batch.clips *= 1e30  # finite input that overflows inside the model
            yield batch
            if self.rank == 1 and self.scenario == "signal_on_rank1" and i == 1 and self.trainer.epoch == 0:
                self.trainer._stop_signal = 15  # what the SIGTERM handler does, on this rank only


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    cfg = TrainConfig(data_root="unused", out_dir=str(out / "run"), preset="tiny", batch_size=2, phase1_epochs=1,
                      phase2_epochs=1, progress=False, checkpoint_every=0, base_lr=0.2, warmup_epochs=0.5)
    loader = _Loader(scenario, rank)
    trainer = Trainer(cfg, loader)
    loader.trainer = trainer
    try:
        trainer.fit()
        result = {"outcome": "finished"}
    except TrainingDiverged as exc:
        result = {"outcome": "diverged", "message": str(exc)}
    except TrainingInterrupted as exc:
        result = {"outcome": "interrupted", "message": str(exc)}
    result["steps"] = trainer.global_step
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
