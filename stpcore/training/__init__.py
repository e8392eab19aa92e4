"""STPrivacy training, phases 1 and 2: :class:`TrainConfig` and :class:`Trainer`.

config.py       TrainConfig, every setting and its [G]/[P] provenance
trainer.py      Trainer: the loop, the phase-1 and phase-2 steps, signals, logging
distributed.py  what the ranks agree on (DDP wrapping, NaN / signal / epoch-end agreement, sharding report)
state.py        the checkpoint (last.pt): format, RNG states, save, load, the resume check
phase2.py       phase-2 extras: the ridge decoder start, privacy-recognizer restarts

The deployed model's file (stprivacy.pt) is ``stpcore.models.save_anonymizer`` / ``load_anonymizer``.
"""

from __future__ import annotations

import importlib

# Names resolve on first use (PEP 562), so importing stpcore.training.config (the CLI's flags) does not load
# the trainer and what it imports.
_EXPORTS = {"TrainConfig": "config", "PHASES": "trainer", "Trainer": "trainer", "TrainingDiverged": "trainer",
            "TrainingInterrupted": "trainer", "MainWriteFailed": "distributed"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"stpcore.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'stpcore.training' has no attribute {name!r}")
