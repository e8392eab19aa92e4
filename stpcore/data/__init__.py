"""Video data: HMDB51/UCF101 splits, VP privacy labels, clip sampling, PyAV and DALI decoding, loaders.

Importing this package needs neither PyAV nor DALI; they are imported where a video is decoded.
"""

from __future__ import annotations

from stpcore.data.labels import (
    PRIVACY_ATTRIBUTES,
    LabelError,
    UnsafePickleError,
    load_labels,
    load_privacy_pickle,
    read_labels_csv,
    write_labels_csv,
)
from stpcore.data.loader import Batch, DataConfig, DataReport, DataWarning, get_loader
from stpcore.data.sampling import CROP_SIZE, DEFAULT_STRIDE, NUM_FRAMES, TEST_CLIPS, TEST_CROPS
from stpcore.data.splits import VideoRecord, list_records

__all__ = [
    "CROP_SIZE",
    "DEFAULT_STRIDE",
    "NUM_FRAMES",
    "PRIVACY_ATTRIBUTES",
    "TEST_CLIPS",
    "TEST_CROPS",
    "Batch",
    "DataConfig",
    "DataReport",
    "DataWarning",
    "LabelError",
    "UnsafePickleError",
    "VideoRecord",
    "get_loader",
    "list_records",
    "load_labels",
    "load_privacy_pickle",
    "read_labels_csv",
    "write_labels_csv",
]
