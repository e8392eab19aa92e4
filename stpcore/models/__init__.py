"""STPrivacy and the video recognizers: configs, models, their files (the deployed format, the release's)."""

from __future__ import annotations

from stpcore.models.checkpoints import (
    LoadReport,
    inflate_2d_vit,
    load_anonymizer,
    load_inflated_2d_vit,
    load_official_state_dict,
    save_anonymizer,
    unwrap_state_dict,
)
from stpcore.models.config import (
    RECOGNIZER_PRESETS,
    STPRIVACY_PRESETS,
    BackboneConfig,
    RecognizerConfig,
    STPrivacyConfig,
)
from stpcore.models.predictor import ScorePredictor
from stpcore.models.recognizer import VideoRecognizer, VideoTransformer, masked_mean
from stpcore.models.stprivacy import STPrivacy, STPrivacyOutput

__all__ = [
    "RECOGNIZER_PRESETS",
    "STPRIVACY_PRESETS",
    "BackboneConfig",
    "LoadReport",
    "RecognizerConfig",
    "STPrivacy",
    "STPrivacyConfig",
    "STPrivacyOutput",
    "ScorePredictor",
    "VideoRecognizer",
    "VideoTransformer",
    "inflate_2d_vit",
    "load_anonymizer",
    "load_inflated_2d_vit",
    "load_official_state_dict",
    "masked_mean",
    "save_anonymizer",
    "unwrap_state_dict",
]
