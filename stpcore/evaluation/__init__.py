"""Phase 3 of STPrivacy: a frozen anonymizer (and the baselines) judged by fresh recognizers.

config.py    EvalConfig, and the clip geometry a checkpoint fixes
metrics.py   view averaging, action top-1, privacy AP / cMAP and F1
methods.py   the transforms compared: raw, downsampling, blur, blacken, STPrivacy
protocol.py  the recognizers' training and test, evaluate, the trade-off sweep
results.py   MethodResult, SweepPoint
report.py    results.md / results.csv beside the paper's Table 1, sweep.csv / sweep.png
"""

from __future__ import annotations

from stpcore.evaluation.config import EvalConfig, check_geometry
from stpcore.evaluation.methods import (
    BLUR_SIGMAS,
    METHODS,
    Blacken,
    Downsample,
    GaussianBlur,
    MethodTransform,
    Raw,
    STPrivacyTransform,
    make_transform,
)
from stpcore.evaluation.metrics import Metrics, average_views, video_metrics
from stpcore.evaluation.protocol import (
    default_loader,
    evaluate,
    evaluate_method,
    load_checkpoint,
    recognizer_config,
    sweep,
)
from stpcore.evaluation.report import PAPER_RESULTS, paper_table, results_table, write_results, write_sweep
from stpcore.evaluation.results import MethodResult, SweepPoint

__all__ = [
    "BLUR_SIGMAS",
    "METHODS",
    "PAPER_RESULTS",
    "Blacken",
    "Downsample",
    "EvalConfig",
    "GaussianBlur",
    "MethodResult",
    "MethodTransform",
    "Metrics",
    "Raw",
    "STPrivacyTransform",
    "SweepPoint",
    "average_views",
    "check_geometry",
    "default_loader",
    "evaluate",
    "evaluate_method",
    "load_checkpoint",
    "make_transform",
    "paper_table",
    "recognizer_config",
    "results_table",
    "sweep",
    "video_metrics",
    "write_results",
    "write_sweep",
]
