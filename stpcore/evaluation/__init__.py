"""Phase 3 of STPrivacy: a frozen anonymizer (and the baselines) judged by fresh recognizers.

config.py    EvalConfig, and the clip geometry a checkpoint fixes
metrics.py   view averaging, action top-1, privacy AP / cMAP and F1
methods.py   the transforms compared: raw, downsampling, blur, blacken, STPrivacy
protocol.py  the recognizers' training and test, evaluate, the trade-off sweep
results.py   MethodResult, SweepPoint
report.py    results.md / results.csv beside the paper's Table 1, sweep.csv / sweep.png
"""

from __future__ import annotations

import importlib

# Names resolve on first use (PEP 562), so importing stpcore.evaluation.config (the CLI's flags) does not load
# the protocol and what it imports.
_EXPORTS = {
    **dict.fromkeys(("EvalConfig", "check_geometry"), "config"),
    **dict.fromkeys(("BLUR_SIGMAS", "METHODS", "Blacken", "Downsample", "GaussianBlur", "MethodTransform", "Raw",
                     "STPrivacyTransform", "make_transform"), "methods"),
    **dict.fromkeys(("Metrics", "average_views", "video_metrics"), "metrics"),
    **dict.fromkeys(("default_loader", "evaluate", "evaluate_method", "load_checkpoint", "recognizer_config",
                     "sweep"), "protocol"),
    **dict.fromkeys(("PAPER_RESULTS", "paper_table", "results_table", "write_results", "write_sweep"), "report"),
    **dict.fromkeys(("MethodResult", "SweepPoint"), "results"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"stpcore.evaluation.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'stpcore.evaluation' has no attribute {name!r}")
