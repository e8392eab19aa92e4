"""stpcore: a fast engine for STPrivacy (video-level privacy-preserving action recognition).

``import stpcore`` needs only torch, numpy and einops: Triton kernels (``stpcore.kernels``) and video
decoders (PyAV, NVIDIA DALI) are imported lazily, where they are used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from stpcore import ops  # noqa: E402  (the functional API is part of the top-level namespace)

__all__ = ["__version__", "ops"]
