"""NVIDIA DALI decoding: `fn.decoders.video` on "mixed" (GPU, NVDEC) or "cpu", then resize/crop/normalise in DALI.

The resize, crop and normalisation are `stpcore.data.preprocess`'s choices (working scale, antialiased linear
filter to uint8, ImageNet statistics) written as DALI operators; `tests/data/test_preprocess.py` bounds the
difference from the PyAV path.

The pipeline takes each sample's encoded file bytes and its frame indices, resize size, crop position and
flip from `fn.external_source`, so clip sampling (sampling.py) and sharding are the same code as the PyAV
path and both paths cut the same clips for the same seed. The CPU backend decodes VP8/VP9/MJPEG only; the
mixed backend also H.264, HEVC, AV1 and MPEG-4 Part 2.

A batch that fails (a corrupt file the probe did not catch) is retried one sample at a time and the
failing samples are dropped and reported, so one bad video never ends an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stpcore.data.preprocess import working_short_side
from stpcore.data.sampling import CROP_SIZE, ClipSpec, crop_position, resized_size
from stpcore.media import IMAGENET_MEAN, IMAGENET_STD

DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = frozenset({"vp8", "vp9", "mjpeg", "h264", "hevc", "av1", "mpeg4"})


def dali_available() -> bool:
    """True if nvidia.dali imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # a broken CUDA install can raise more than ImportError
        return False
    return True


def dali_codecs(device: str) -> frozenset[str]:
    """FFmpeg codec names DALI decodes on `device` ("cpu" or "gpu"/"cuda"/"mixed")."""
    return DALI_CPU_CODECS if device == "cpu" else DALI_GPU_CODECS


@dataclass(frozen=True)
class DaliItem:
    """One clip to decode: the file, its frame size as stored (from the probe), the clip to cut, and the quarter
    turns counterclockwise that show it upright (its display rotation, which DALI's decoder does not apply)."""

    path: Path
    height: int
    width: int
    spec: ClipSpec
    turns: int = 0

    @property
    def upright_size(self) -> tuple[int, int]:
        """(height, width) as displayed."""
        return (self.width, self.height) if self.turns % 2 else (self.height, self.width)


class DaliClipDecoder:
    """Decode clips with a DALI pipeline into float32 (B, 3, T, crop, crop) tensors.

    Args:
        device: "cpu" or "cuda" (the decoder then runs on "mixed" and the output stays on the GPU).
        max_batch: most clips per call.
        num_threads: DALI CPU threads.
        device_id: CUDA device index (ignored on CPU).
        short_side, crop, mean, std: as in ``preprocess.clip_tensor`` (short_side None: 8/7 of the crop; mean/std
            on the [0, 1] scale).
    """

    def __init__(
        self,
        device: str = "cpu",
        max_batch: int = 8,
        num_threads: int = 2,
        device_id: int = 0,
        short_side: int | None = None,
        crop: int = CROP_SIZE,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        if not dali_available():
            raise RuntimeError("nvidia-dali is not installed (pip install 'stpcore[dali]')")
        self.device = "cpu" if device == "cpu" else "cuda"
        self.max_batch = max_batch
        self.num_threads = num_threads
        self.device_id = device_id
        self.short_side = short_side or working_short_side(crop)
        self.crop = crop
        self.mean = tuple(float(m) * 255.0 for m in mean)
        self.std = tuple(float(s) * 255.0 for s in std)
        self._pipes: dict[bool, object] = {False: self._build(False)}  # True: the one that turns, built when needed

    def _build(self, turn: bool):
        """The pipeline; ``turn``: with the quarter turns of videos stored sideways (a copy of every clip's frames:
        1.09x a batch's time on DALI-CPU, BENCHMARKS.md), so the pipeline without it serves batches that need none."""
        from nvidia.dali import fn, pipeline_def, types

        decoder_device = "cpu" if self.device == "cpu" else "mixed"
        crop = self.crop
        mean, std = list(self.mean), list(self.std)

        # prefetch_queue_depth=1: each run() consumes exactly the batch just fed (batches vary in size
        # when a failed batch is retried sample by sample).
        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=None if self.device == "cpu" else self.device_id,
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def clip_pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            size_y = fn.external_source(name="size_y", dtype=types.FLOAT, ndim=0)
            size_x = fn.external_source(name="size_x", dtype=types.FLOAT, ndim=0)
            pos_y = fn.external_source(name="pos_y", dtype=types.FLOAT, ndim=0)
            pos_x = fn.external_source(name="pos_x", dtype=types.FLOAT, ndim=0)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            video = fn.decoders.video(encoded, device=decoder_device, frames=frames)  # (T, H, W, 3) uint8, as stored
            video = fn.resize(video, resize_x=size_x, resize_y=size_y, antialias=True)
            if turn:  # upright as displayed: quarter turns with nearest-neighbour sampling are exact (np.rot90's)
                angle = fn.external_source(name="angle", dtype=types.FLOAT, ndim=0)
                video = fn.rotate(video, angle=angle, keep_size=False, interp_type=types.INTERP_NN)
            return fn.crop_mirror_normalize(
                video,
                crop=(crop, crop),
                crop_pos_x=pos_x,
                crop_pos_y=pos_y,
                mirror=mirror,
                mean=mean,
                std=std,
                dtype=types.FLOAT,
                output_layout="CFHW",
            )  # (3, T, crop, crop) float

        pipe = clip_pipeline()
        pipe.build()
        return pipe

    def _run(self, items: list[DaliItem]) -> torch.Tensor:
        turn = any(it.turns % 4 for it in items)
        if turn not in self._pipes:
            self._pipes[turn] = self._build(turn)
        p = self._pipes[turn]
        # The size after the resize, upright; a video turned a quarter is resized as stored (height and width
        # swapped) and then turned.
        sizes = [resized_size(*it.upright_size, self.short_side) for it in items]
        stored = [(w, h) if it.turns % 2 else (h, w) for it, (h, w) in zip(items, sizes, strict=True)]
        p.feed_input("encoded", [np.fromfile(it.path, dtype=np.uint8) for it in items])
        p.feed_input("frames", [np.asarray(it.spec.frames, dtype=np.int32) for it in items])
        p.feed_input("size_y", [np.float32(s[0]) for s in stored])
        p.feed_input("size_x", [np.float32(s[1]) for s in stored])
        if turn:
            p.feed_input("angle", [np.float32(90 * (it.turns % 4)) for it in items])
        # crop_mirror_normalize's crop_pos is relative to the free space, the same convention as sampling.py.
        positions = [crop_position(it.spec, *it.upright_size) for it in items]
        p.feed_input("pos_y", [np.float32(pos[0]) for pos in positions])
        p.feed_input("pos_x", [np.float32(pos[1]) for pos in positions])
        p.feed_input("mirror", [np.int32(it.spec.flip) for it in items])
        (out,) = p.run()
        if self.device == "cpu":
            return torch.from_numpy(np.array(out.as_tensor()))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()
        result = torch.empty(dense.shape(), dtype=torch.float32, device=f"cuda:{self.device_id}")
        feed_ndarray(dense, result, cuda_stream=torch.cuda.current_stream(self.device_id))
        return result

    def decode(self, items: list[DaliItem]) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
        """Decode up to max_batch clips.

        Returns:
            (clips float32 (B', 3, T, crop, crop), kept indices into `items` (len B'),
             [(index, error message)] for the dropped ones).
        """
        if not items:
            return torch.empty(0, 3, 0, self.crop, self.crop), [], []
        if len(items) > self.max_batch:
            raise ValueError(f"{len(items)} clips > max_batch {self.max_batch}")
        try:
            return self._run(items), list(range(len(items))), []
        except Exception as e:
            self._recover()
            if len(items) == 1:  # the bad sample is known: report it, as the retries below do
                return torch.empty(0, 3, 0, self.crop, self.crop), [], [(0, _first_line(e))]
        # Retry one by one to find the bad samples; the good ones still make it into the batch.
        clips, kept, failed = [], [], []
        for i, it in enumerate(items):
            try:
                clips.append(self._run([it]))
                kept.append(i)
            except Exception as e:
                failed.append((i, _first_line(e)))
                self._recover()
        if not clips:
            return torch.empty(0, 3, 0, self.crop, self.crop), [], failed
        return torch.cat(clips), kept, failed

    def _recover(self) -> None:
        # After an operator error DALI may declare the pipeline invalid; errors are rare, so always rebuild.
        self._pipes = {turn: self._build(turn) for turn in self._pipes}

def _first_line(e: BaseException) -> str:
    text = str(e)
    for line in text.splitlines():
        if "Failed" in line or "not supported" in line or "Error" in line:
            return line.strip()[:200]
    return (text.splitlines() or [type(e).__name__])[0][:200]


def decoder_for_env(device: str | None = None) -> str:
    """'cuda' when a GPU is usable by torch, else 'cpu' (DALI's device choice for `get_loader`)."""
    if device is not None:
        return "cpu" if device == "cpu" else "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"

