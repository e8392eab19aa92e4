"""The methods phase 3 compares: named transforms ``clips (B, 3, T, H, W) normalised -> (video, keep or None)``.

``raw``, ``downsample2``/``downsample4``, ``blur_weak``/``blur_strong``, ``blacken`` (needs person boxes) and
``stprivacy`` (a trained model at a keep ratio, or adaptive with a threshold). The recognizers read only the
kept tubelets: ``mode="gather"`` for equal counts (keep ratio), ``mode="policy"`` for variable counts
(adaptive); the baselines keep every tubelet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from stpcore.models import STPrivacy, STPrivacyConfig

METHODS = ("raw", "downsample2", "downsample4", "blur_weak", "blur_strong", "blacken", "stprivacy")

# Gaussian sigmas in pixels at a 112-pixel clip [G]; scaled with the clip size (sigma * H / 112).
BLUR_SIGMAS = {"blur_weak": 2.0, "blur_strong": 6.0}
REFERENCE_SIZE = 112


class MethodTransform:
    """A named phase-3 transform: ``clips (B, 3, T, H, W) float normalised -> (video, keep)``.

    ``video`` is (B, 3, T, H, W) in the clips' dtype; ``keep`` is (B, N) 0/1 over the tubelet tokens or
    None (every tubelet kept). ``keep_mode`` tells the recognizers how to read the mask ("gather" for
    equal counts, "policy" for variable ones; None when keep is always None).
    """

    name: str = "raw"
    keep_mode: str | None = None
    model_config: STPrivacyConfig | None = None

    def __call__(self, clips: torch.Tensor, video_ids: Sequence[str] | None = None,
                 views: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``views``: the batch's ``Batch.views`` (where each clip lies in its frame), or None."""
        return clips, None

    def to(self, device: str | torch.device) -> MethodTransform:
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Raw(MethodTransform):
    """The raw video (identity): the utility/privacy ceiling."""


class Downsample(MethodTransform):
    """[G] Spatial down-sampling by ``factor``: area (box) averaging to H/factor x W/factor, then nearest
    up-sampling back to H x W, so the recognizer sees exactly the low-resolution pixels as blocks (nearest
    adds no interpolated detail; the clip mean is preserved exactly when factor divides H and W).

    Args:
        factor: the down-sampling factor (2 or 4 for the named methods).
    """

    def __init__(self, factor: int) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.name = f"downsample{factor}"

    def __call__(self, clips, video_ids=None, views=None):
        B, C, T, H, W = clips.shape
        frames = clips.reshape(B, C * T, H, W)  # (B, 3T, H, W): every frame and channel is a 2D image
        # Area averaging and nearest copying are linear and per-channel, so doing them on normalised values
        # equals doing them on pixels and normalising after.
        small = F.interpolate(frames, size=(max(1, H // self.factor), max(1, W // self.factor)), mode="area")
        back = F.interpolate(small, size=(H, W), mode="nearest")
        return back.reshape(B, C, T, H, W), None


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)  # (2r+1,), sums to 1


class GaussianBlur(MethodTransform):
    """Per-frame Gaussian blur, separable, reflect-padded, radius ceil(3 sigma).

    Args:
        sigma: standard deviation in pixels at a 112-pixel clip; scaled by H / 112 for other sizes.
        name: the method's name.
    """

    def __init__(self, sigma: float, name: str = "blur") -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma, self.name = sigma, name

    def __call__(self, clips, video_ids=None, views=None):
        B, C, T, H, W = clips.shape
        sigma = self.sigma * H / REFERENCE_SIZE
        radius = min(math.ceil(3 * sigma), H - 1, W - 1)  # reflect padding needs radius < size
        k = _gaussian_kernel(sigma, radius, clips.dtype, clips.device)
        x = clips.reshape(B * C * T, 1, H, W)  # (B*3*T, 1, H, W): one image per frame and channel
        # Linear with unit gain per channel, so blurring normalised values equals blurring pixels.
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))  # along H
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))  # along W
        return x.reshape(B, C, T, H, W), None


class Blacken(MethodTransform):
    """Zero the pixels inside each video's person box, in every frame.

    Zero is the normalised value STPrivacy gives its dropped tubelets (the dataset mean colour), so the two
    methods differ in what they remove, not in the fill. The box is relative to the whole (upright) frame; each
    clip's crop and flip (``Batch.views``) map it into the clip, so a training clip cut from the left of the frame,
    or mirrored, loses the pixels of the person it shows (without views, from a loader that does not give them,
    the box is taken relative to the clip). Videos without a box stay unchanged and are counted in ``missing``.

    Args:
        boxes: video_id ("<class>/<stem>") -> (x0, y0, x1, y1) relative coordinates in [0, 1] of the frame.
    """

    name = "blacken"

    def __init__(self, boxes: Mapping[str, Sequence[float]]) -> None:
        for vid, box in boxes.items():
            if len(box) != 4 or not (0 <= box[0] <= box[2] <= 1 and 0 <= box[1] <= box[3] <= 1):
                raise ValueError(f"boxes[{vid!r}] must be (x0, y0, x1, y1) with 0 <= x0 <= x1 <= 1 and "
                                 f"0 <= y0 <= y1 <= 1, got {tuple(box)}")
        self.boxes = {k: tuple(float(v) for v in b) for k, b in boxes.items()}
        self.missing: set[str] = set()

    def __call__(self, clips, video_ids=None, views=None):
        if video_ids is None or len(video_ids) != clips.shape[0]:
            raise ValueError("blacken needs the batch's video_ids (one per clip) to find each video's box")
        if views is not None and len(views) != clips.shape[0]:
            raise ValueError(f"blacken: {len(views)} views for {clips.shape[0]} clips")
        H, W = clips.shape[-2:]
        inside = torch.zeros(clips.shape[0], 1, 1, H, W, dtype=torch.bool)  # built on the host: tiny
        for i, vid in enumerate(video_ids):
            box = self.boxes.get(vid)
            if box is None:
                self.missing.add(vid)
                continue
            x0, y0, x1, y1 = box
            if views is not None:  # frame -> clip: shift and scale by the crop, mirror with the flip
                vy, vx, vh, vw, flip = (float(v) for v in views[i])
                x0, x1 = (x0 - vx) / vw, (x1 - vx) / vw
                y0, y1 = (y0 - vy) / vh, (y1 - vy) / vh
                if flip:
                    x0, x1 = 1.0 - x1, 1.0 - x0
                x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
                if x0 >= x1 or y0 >= y1:  # the person is outside this crop
                    continue
            # Cover every pixel the box touches.
            inside[i, :, :, math.floor(y0 * H):math.ceil(y1 * H), math.floor(x0 * W):math.ceil(x1 * W)] = True
        return clips.masked_fill(inside.to(clips.device, non_blocking=True), 0.0), None


class STPrivacyTransform(MethodTransform):
    """A trained STPrivacy model, frozen, in eval mode: video = out.video (dropped tubelets exactly zero),
    keep = out.keep.

    Args:
        model: the STPrivacy model (put in eval mode, gradients off).
        keep_ratio: per-stage alpha at inference (None: the model's configured one); equal counts, read
            with mode="gather".
        threshold: adaptive mode: keep tokens whose keep probability exceeds it; variable counts, read with
            mode="policy". Excludes keep_ratio.
    """

    def __init__(self, model: STPrivacy, keep_ratio: float | None = None, threshold: float | None = None) -> None:
        if keep_ratio is not None and threshold is not None:
            raise ValueError("pass keep_ratio or threshold, not both")
        model.check_keep_setting(keep_ratio, threshold)
        self.model = model.eval().requires_grad_(False)
        self.model_config = model.cfg
        self.keep_ratio, self.threshold = keep_ratio, threshold
        if threshold is not None:
            self.name, self.keep_mode = f"stprivacy@t={threshold:g}", "policy"
        else:
            ratio = model.cfg.keep_ratio if keep_ratio is None else keep_ratio
            self.name, self.keep_mode = f"stprivacy@{ratio:g}", "gather"

    def to(self, device):
        self.model.to(device)
        return self

    def __call__(self, clips, video_ids=None, views=None):
        with torch.no_grad():  # frozen: no graph through the anonymizer
            out = self.model(clips, keep_ratio=self.keep_ratio, adaptive_threshold=self.threshold)
        return out.video, out.keep


def make_transform(
    name: str,
    *,
    anonymizer: STPrivacy | None = None,
    keep_ratio: float | None = None,
    threshold: float | None = None,
    boxes: Mapping[str, Sequence[float]] | None = None,
) -> MethodTransform:
    """The transform of a named method (see :data:`METHODS`).

    Args:
        name: one of METHODS.
        anonymizer: the STPrivacy model ("stprivacy" only).
        keep_ratio, threshold: STPrivacy's inference setting ("stprivacy" only; at most one).
        boxes: video_id -> (x0, y0, x1, y1) relative person boxes ("blacken" only).
    """
    if name == "raw":
        return Raw()
    if name in ("downsample2", "downsample4"):
        return Downsample(int(name[-1]))
    if name in BLUR_SIGMAS:
        return GaussianBlur(BLUR_SIGMAS[name], name)
    if name == "blacken":
        if boxes is None:
            raise ValueError("blacken needs person boxes (a mapping video_id -> (x0, y0, x1, y1))")
        return Blacken(boxes)
    if name == "stprivacy":
        if anonymizer is None:
            raise ValueError("stprivacy needs a trained model: pass a checkpoint (stprivacy.pt or last.pt)")
        return STPrivacyTransform(anonymizer, keep_ratio=keep_ratio, threshold=threshold)
    raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
