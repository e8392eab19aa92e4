"""STPrivacy training, phases 1 and 2: :class:`TrainConfig` and :class:`Trainer`.

config.py       TrainConfig, every setting and its [G]/[P] provenance
trainer.py      Trainer: the loop, the phase-1 and phase-2 steps, signals, logging
distributed.py  what the ranks agree on (DDP wrapping, NaN / signal / epoch-end agreement, sharding report)
state.py        the checkpoint (last.pt): format, RNG states, save, load, the resume check
phase2.py       phase-2 extras: the ridge decoder start, privacy-recognizer restarts

The deployed model's file (stprivacy.pt) is ``stpcore.models.save_anonymizer`` / ``load_anonymizer``.
"""

from __future__ import annotations

from stpcore.training.config import TrainConfig
from stpcore.training.trainer import PHASES, Trainer, TrainingDiverged, TrainingInterrupted

__all__ = ["PHASES", "TrainConfig", "Trainer", "TrainingDiverged", "TrainingInterrupted"]
