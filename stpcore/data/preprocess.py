"""The one preprocessing of frames into the model's input, shared by training, evaluation and anonymization.

Every path that feeds the model (the PyAV loader, its in-memory cache, the evaluation's loaders and
``stpcore anonymize``) calls :func:`to_working_scale`, then cuts windows with :func:`crop_normalize`; the DALI
loader runs the same three choices inside its pipeline (``decode_dali``), within a stated tolerance:

1. the working scale: the short side resized to :func:`working_short_side` of the crop, 8/7 (128 for the
   112 crop) [G: the usual resize-then-crop of video ViTs; the paper gives only the 112 crop];
2. the filter: torch's bilinear with antialiasing when shrinking, rounded to uint8 (a picture at the
   working scale, so a cached video and a freshly decoded one are the same bytes);
3. ImageNet's mean/std normalisation.

BENCHMARKS.md ("Preprocessing") has the measurement behind keeping this choice for deployment too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stpcore.data.sampling import CROP_SIZE, ClipSpec, crop_origin, crop_position, resized_size
from stpcore.media import IMAGENET_MEAN, IMAGENET_STD


def working_short_side(crop: int) -> int:
    """The short side frames are resized to before ``crop`` x ``crop`` windows are cut: 8/7 of the crop."""
    return round(crop * 8 / 7)


_FLOAT_CHUNK_BYTES = 64 * 1024 * 1024


def to_working_scale(frames: np.ndarray | torch.Tensor, short_side: int) -> torch.Tensor:
    """Resize frames so the short side is ``short_side`` (aspect kept; bilinear, antialiased when shrinking).

    Args:
        frames: uint8 (T, H, W, 3) RGB.
    Returns:
        uint8 (T, 3, H', W') with (H', W') = ``sampling.resized_size(H, W, short_side)``.
    """
    x = torch.as_tensor(frames)
    if x.dim() != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"to_working_scale: expected uint8 (T, H, W, 3) frames, got {x.dtype} {tuple(x.shape)}")
    _, h, w, _ = x.shape
    x = x.permute(0, 3, 1, 2)  # (T, 3, H, W)
    rh, rw = resized_size(h, w, short_side)
    if (rh, rw) == (h, w):
        return x.contiguous()
    # In chunks of frames whose float32 copy stays near 64 MB: a 2048x2048 video's 40 frames took 2.5 GB at once
    # (each frame is resized on its own, so the result is the same).
    step = max(1, _FLOAT_CHUNK_BYTES // (h * w * 3 * 4))
    out = torch.empty((x.shape[0], 3, rh, rw), dtype=torch.uint8)
    for i in range(0, x.shape[0], step):
        part = F.interpolate(x[i:i + step].float(), size=(rh, rw), mode="bilinear", align_corners=False,
                             antialias=True)
        out[i:i + step] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def normalize(pixels: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """(T, 3, h, w) pixels on the [0, 255] scale (uint8 or float) -> float32 (3, T, h, w), (x / 255 - mean) / std."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((pixels.float() - m) / s).permute(1, 0, 2, 3).contiguous()


def crop_normalize(
    resized: torch.Tensor,
    spec: ClipSpec,
    crop: int = CROP_SIZE,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """Cut ``crop`` x ``crop`` at the spec's position, flip if asked, :func:`normalize`.

    Args:
        resized: (T, 3, H', W') on the [0, 255] scale (from :func:`to_working_scale`).
    Returns:
        float32 (3, T, crop, crop).
    """
    rh, rw = resized.shape[-2:]
    if min(rh, rw) < crop:
        raise ValueError(f"a {rh}x{rw} frame is smaller than the {crop}x{crop} crop: the working short side must be "
                         f">= the crop")
    pos_y, pos_x = crop_position(spec, rh, rw)
    y0, x0 = crop_origin(rh, crop, pos_y), crop_origin(rw, crop, pos_x)
    x = resized[:, :, y0 : y0 + crop, x0 : x0 + crop]
    if spec.flip:
        x = x.flip(-1)
    return normalize(x, mean, std)


def clip_tensor(
    frames: np.ndarray | torch.Tensor,
    spec: ClipSpec,
    short_side: int | None = None,
    crop: int = CROP_SIZE,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """:func:`to_working_scale` then :func:`crop_normalize`: one clip, uint8 (T, H, W, 3) -> float32
    (3, T, crop, crop). ``short_side`` None: the working scale of ``crop``, :func:`working_short_side`."""
    return crop_normalize(to_working_scale(frames, short_side or working_short_side(crop)), spec, crop, mean, std)
