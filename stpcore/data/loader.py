"""Clip batches for training and evaluation: `DataConfig`, `get_loader`, and the PyAV and DALI loaders.

Both loaders yield the same `Batch` and keep a `DataReport`: a video that cannot be used (missing, empty,
unreadable, a codec the decoder cannot read) is skipped with a warning naming the file and the reason, a
video shorter than one clip is looped with a warning, and `loader.report()` counts all of it. One bad video
never ends an epoch: its sample is dropped from its batch.

Train mode: one clip per video (random offset, random crop, flip); `batch_size` counts clips.
Test mode: `TEST_CLIPS` x `TEST_CROPS` = 15 views per video, kept together in one batch; `batch_size` counts
videos, so a batch holds up to 15 * batch_size clips, each carrying `video_index` and `clip_index` so
predictions can be averaged per video.
"""

from __future__ import annotations

import signal
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stpcore.data.decode_pyav import VideoError, VideoInfo
from stpcore.data.labels import PRIVACY_ATTRIBUTES, load_labels
from stpcore.data.sampling import (
    CROP_SIZE,
    DEFAULT_STRIDE,
    NUM_FRAMES,
    TEST_CLIPS,
    TEST_CROPS,
    ClipSpec,
    clip_span,
    eval_clips,
    resized_size,
    shard_indices,
    train_clip,
    view_window,
)
from stpcore.data.splits import VideoRecord, detect_kind, list_records, validation_partition
from stpcore.media import IMAGENET_MEAN, IMAGENET_STD


class DataWarning(UserWarning):
    """A video was skipped or altered (looped, dropped); the message names the file and the reason."""


@dataclass(frozen=True)
class DataConfig:
    """Everything a loader needs; the single source of truth for the data side of a run.

    Attributes:
        root: dataset root (`<root>/<class>/<video>.*`).
        kind: "hmdb51", "ucf101" or "auto" (from the split files).
        split: official split 1..3.
        train: training list (random clips) if True, else test list (5 clips x 3 crops per video).
        split_dir: folder of the split files (default: root).
        labels: privacy label file (.pickle or .csv); None = no privacy labels (batch.has_privacy all False).
        batch_size: clips per batch (train) or videos per batch (test).
        workers: PyAV: DataLoader worker processes; DALI: decoder threads.
        decoder: "auto" (DALI when a GPU and DALI are present, else PyAV), "pyav" or "dali".
        device: "auto", "cpu" or "cuda": where DALI decodes ("cuda" = mixed backend).
        stride: frame stride; None = the paper's (2 for HMDB51, 4 for UCF101).
        num_frames, short_side, crop: clip length, resize target of the short side (None: the working scale,
            ``preprocess.working_short_side(crop)``, 8/7 of the crop), crop size.
        mean, std: normalisation on the [0, 1] scale (ImageNet by default).
        flip: random horizontal flip in train mode.
        shard_id, num_shards: this rank's shard (torchrun: RANK, WORLD_SIZE).
        seed: shuffling and clip sampling seed; the epoch is mixed in.
        drop_last: drop a last partial batch in train mode.
        cache: PyAV path: keep every decoded, resized video in memory (uint8) so each is decoded once per
            run instead of once per epoch; for small datasets (the synthetic one). Decoding then runs in the
            main process (workers is ignored), since worker processes would not keep the cache.
        validation: the fraction of the training split's videos held out for model selection (0: none);
            ``splits.validation_partition`` draws them per class, whole scenes at a time, the same in every run.
        part: which videos of the training split: "all", "fit" (without the held-out ones) or "validation"
            (the held-out ones, sampled like a test split: 5 clips x 3 crops each, in order); "fit" and
            "validation" need ``validation`` > 0 and the training split.
    """

    root: str | Path
    kind: str = "auto"
    split: int = 1
    train: bool = True
    split_dir: str | Path | None = None
    labels: str | Path | None = None
    batch_size: int = 8
    workers: int = 2
    decoder: str = "auto"
    device: str = "auto"
    stride: int | None = None
    num_frames: int = NUM_FRAMES
    short_side: int | None = None
    crop: int = CROP_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    flip: bool = True
    shard_id: int = 0
    num_shards: int = 1
    seed: int = 0
    drop_last: bool = False
    cache: bool = False
    validation: float = 0.0
    part: str = "all"

    @property
    def sampled_for_training(self) -> bool:
        """Random clips, shuffled (training), or every test view in order (test split, and the validation part,
        which is scored like a test split)."""
        return self.train and self.part != "validation"

    def __post_init__(self) -> None:
        from stpcore.data.splits import PARTS

        if self.part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {self.part!r}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1 frame (None: the dataset's default), got {self.stride}")
        if self.part != "all" and not 0 < self.validation < 1:
            raise ValueError(f"part={self.part!r} needs a validation fraction in (0, 1), got {self.validation}")
        if self.part != "all" and not self.train:
            raise ValueError("the validation part is carved from the training split (train=True), never the test "
                             "split")
        from stpcore.data.preprocess import working_short_side

        if self.short_side is None:
            object.__setattr__(self, "short_side", working_short_side(self.crop))
        if self.short_side < self.crop:
            raise ValueError(f"short_side ({self.short_side}) must be >= crop ({self.crop}): the frames are resized to "
                             f"that short side and the crop cut from them (default: {working_short_side(self.crop)})")


@dataclass
class Batch:
    """A batch of clips.

    Attributes:
        clips: float32 (B, 3, T, crop, crop), normalised.
        actions: int64 (B,) action class.
        privacy: float32 (B, 5) privacy labels (PRIVACY_ATTRIBUTES order); 0 where has_privacy is False.
        has_privacy: bool (B,).
        video_index: int64 (B,) index of the clip's video in `loader.records`.
        clip_index: int64 (B,) view index within the video (test: temporal * 3 + spatial; train: 0).
        video_ids: B strings "<class>/<stem>".
        order_end: how far into this epoch's video order (the shard's) the loader had read when it made this batch,
            unreadable videos included; a resumed run starts there (``start_at(video=...)``). None from loaders
            that do not track it.
        views: float32 (B, 5) where each clip lies in its frame, relative to the frame: (y0, x0, h, w, flip)
            (``sampling.view_window``), so a box given on the whole frame maps into the clip (the blacken
            baseline); None from loaders that do not say.
    """

    clips: torch.Tensor
    actions: torch.Tensor
    privacy: torch.Tensor
    has_privacy: torch.Tensor
    video_index: torch.Tensor
    clip_index: torch.Tensor
    video_ids: list[str]
    order_end: int | None = None
    views: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.video_ids)

    def to(self, device: str | torch.device, non_blocking: bool = True) -> Batch:
        """The same batch with its tensors on `device`."""
        t = {
            k: getattr(self, k).to(device, non_blocking=non_blocking)
            for k in ("clips", "actions", "privacy", "has_privacy", "video_index", "clip_index")
        }
        return Batch(**t, video_ids=self.video_ids, order_end=self.order_end, views=self.views)


@dataclass
class DataReport:
    """Counts of skipped / altered videos by reason, with the first few files of each."""

    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    clips: int = 0
    max_examples: int = 5
    # The counts made at construction (split entries without a file, videos without labels): every shard of a
    # torchrun run counts these alike, so a report summed over the ranks takes them once.
    shared: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(path)

    def summary(self) -> str:
        """Human-readable report, one reason per line with example files."""
        lines = [f"clips delivered: {self.clips}"]
        for reason in sorted(self.counts):
            lines.append(f"{reason}: {self.counts[reason]}")
            lines.extend(f"  {p}" for p in self.examples[reason])
        return "\n".join(lines)


# Reasons that mean "the video was used anyway" rather than "skipped".
_ALTERED = ("short video, looped",)


def _probe_cached(path: Path, cache: dict[str, VideoInfo | VideoError]) -> VideoInfo:
    from stpcore.data.decode_pyav import probe

    key = str(path)
    if key not in cache:
        try:
            cache[key] = probe(path)
        except VideoError as e:
            cache[key] = e
    hit = cache[key]
    if isinstance(hit, VideoError):
        raise hit
    return hit


def _video_specs(cfg: DataConfig, stride: int, info: VideoInfo, index: int, epoch: int) -> list[ClipSpec]:
    if cfg.sampled_for_training:
        rng = np.random.default_rng([cfg.seed, epoch, index])
        return [train_clip(info.num_frames, rng, cfg.num_frames, stride, flip=cfg.flip)]
    return eval_clips(info.num_frames, cfg.num_frames, stride, TEST_CLIPS, TEST_CROPS)


class _ClipDataset(torch.utils.data.Dataset):
    """PyAV map-style dataset over videos; returns a dict of clips or of the reason the video failed."""

    def __init__(self, records: Sequence[VideoRecord], cfg: DataConfig, stride: int) -> None:
        self.records = records
        self.cfg = cfg
        self.stride = stride
        self.epoch = 0
        self._probe_cache: dict[str, VideoInfo | VideoError] = {}
        self._frames: dict[int, torch.Tensor] = {}  # cfg.cache: index -> uint8 (F, 3, H', W') resized video

    def __len__(self) -> int:
        return len(self.records)

    def _cached_video(self, index: int, info: VideoInfo) -> torch.Tensor:
        from stpcore.data.decode_pyav import decode_frames
        from stpcore.data.preprocess import to_working_scale

        if index not in self._frames:
            frames, _ = decode_frames(self.records[index].path, np.arange(info.num_frames), self.cfg.short_side)
            self._frames[index] = to_working_scale(frames, self.cfg.short_side)  # resized already: (F, 3, H', W')
        return self._frames[index]

    def __getitem__(self, index: int) -> dict:
        from stpcore.data.decode_pyav import decode_frames
        from stpcore.data.preprocess import crop_normalize, to_working_scale

        rec = self.records[index]
        cfg = self.cfg
        events: list[tuple[str, str]] = []
        try:
            info = _probe_cached(rec.path, self._probe_cache)
            specs = _video_specs(cfg, self.stride, info, index, self.epoch)
            if specs[0].short:
                events.append(("short video, looped", f"{rec.path} ({info.num_frames} frames < "
                                                      f"{clip_span(cfg.num_frames, self.stride)})"))
            # Decode and resize every frame any view needs once, then cut the views from them.
            if cfg.cache:
                resized = self._cached_video(index, info)  # uint8 (F, 3, H', W'), every frame
                pos = {f: f for f in range(resized.shape[0])}
            else:
                wanted = np.unique(np.concatenate([s.frames for s in specs]))
                frames, _ = decode_frames(rec.path, wanted, cfg.short_side)  # resized as decoded
                resized = to_working_scale(frames, cfg.short_side)  # uint8 (F, 3, H', W'), resized already
                pos = {int(f): i for i, f in enumerate(wanted)}
            clips = [
                crop_normalize(resized[[pos[int(f)] for f in s.frames]], s, cfg.crop, cfg.mean, cfg.std)
                for s in specs
            ]
            views = [view_window(s, *resized.shape[-2:], cfg.crop) for s in specs]
        except VideoError as e:
            return {"index": index, "error": (e.reason, str(e)), "events": events}
        except Exception as e:  # anything else FFmpeg or numpy throws on damaged input: skip, never crash
            return {"index": index, "error": ("decode error", f"{rec.path}: {type(e).__name__}: {e}"), "events": events}
        return {
            "index": index,
            "clips": torch.stack(clips),  # (V, 3, T, crop, crop)
            "clip_index": [s.clip_index for s in specs],
            "views": views,
            "events": events,
        }


def _make_batch(
    records: Sequence[VideoRecord],
    clips: torch.Tensor,
    video_index: Sequence[int],
    clip_index: Sequence[int],
    order_end: int | None = None,
    views: Sequence[Sequence[float]] | None = None,
) -> Batch:
    actions = [records[i].action for i in video_index]
    privacy = np.zeros((len(video_index), len(PRIVACY_ATTRIBUTES)), dtype=np.float32)
    has = np.zeros(len(video_index), dtype=bool)
    for row, i in enumerate(video_index):
        p = records[i].privacy
        if p is not None:
            privacy[row] = np.asarray(p).reshape(-1)
            has[row] = True
    return Batch(
        clips=clips,
        actions=torch.tensor(actions, dtype=torch.int64),
        privacy=torch.from_numpy(privacy),
        has_privacy=torch.from_numpy(has),
        video_index=torch.tensor(list(video_index), dtype=torch.int64),
        clip_index=torch.tensor(list(clip_index), dtype=torch.int64),
        video_ids=[records[i].video_id for i in video_index],
        order_end=order_end,
        views=torch.tensor(views, dtype=torch.float32).reshape(-1, 5) if views is not None else None,
    )


def _collate(samples: list[dict]) -> dict:
    # Runs in the worker: stack the good samples, pass the failures and warnings on to the main process.
    good = [s for s in samples if "clips" in s]
    out: dict = {
        "errors": [s["error"] for s in samples if "error" in s],
        "events": [e for s in samples for e in s["events"]],
        "video_index": [s["index"] for s in good for _ in s["clip_index"]],
        "clip_index": [c for s in good for c in s["clip_index"]],
        "views": [v for s in good for v in s["views"]],
    }
    out["clips"] = torch.cat([s["clips"] for s in good]) if good else None
    return out


class _LoaderBase:
    """Records, labels, sharding, epoch counting and the report shared by both loaders."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        split_dir = cfg.split_dir if cfg.split_dir is not None else cfg.root
        if cfg.kind not in ("auto", *DEFAULT_STRIDE):
            raise ValueError(f"kind must be 'auto', {', '.join(repr(k) for k in DEFAULT_STRIDE)} (the dataset's "
                             f"layout), got {cfg.kind!r}")
        self.kind = detect_kind(split_dir) if cfg.kind == "auto" else cfg.kind
        self.stride = cfg.stride if cfg.stride is not None else DEFAULT_STRIDE[self.kind]
        labels = load_labels(cfg.labels) if cfg.labels is not None else None
        listing = list_records(cfg.root, self.kind, cfg.split, cfg.train, split_dir, labels)
        self.records: list[VideoRecord] = listing.records
        self.classes: list[str] = listing.classes
        if cfg.part != "all":
            fit, held = validation_partition(self.records, self.classes, cfg.validation)
            self.records = [self.records[i] for i in (fit if cfg.part == "fit" else held)]
        self.epoch = 0
        self._start = 0  # first video (position in the epoch's order) of the next iteration (start_at)
        self._report = DataReport()
        self._warned: set[tuple[str, str]] = set()
        for key in listing.missing:
            self._event("missing file (split entry)", f"{Path(cfg.root) / key}.*")
        if labels is not None:
            if self.records and all(rec.privacy is None for rec in self.records):
                # Training would go on, phase 2 with no privacy supervision, and warn only after phase 1's epochs.
                raise ValueError(
                    f"{cfg.labels}: none of its {len(labels)} label keys names one of the {len(self.records)} "
                    f"videos of {cfg.root} (split {cfg.split}, {'train' if cfg.train else 'test'}): e.g. label "
                    f"{next(iter(labels), None)!r}, video {self.records[0].video_id!r}. Is it the other dataset's "
                    f"label file? `stpcore data check {cfg.root} --labels {cfg.labels}` compares them")
            for rec in self.records:
                if rec.privacy is None:
                    self._report.add("video without privacy label", rec.video_id)
        self._report.shared = dict(self._report.counts)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (reshuffles and resamples clips, like DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def start_at(self, batch: int | None = None, *, video: int | None = None) -> None:
        """Make the next iteration begin part-way into the epoch (a resumed run) without decoding what comes
        before: at ``video``, a position in the shard's order for this epoch (a batch's ``order_end``: exact,
        unreadable videos included), or at ``batch`` (``batch * batch_size`` videos in: exact only when the part
        skipped held no unreadable video, which shifts later batches)."""
        if (batch is None) == (video is None):
            raise ValueError("start_at: give either batch or video")
        start = video if video is not None else batch * self.cfg.batch_size
        if start < 0:
            raise ValueError(f"start_at: the start must be >= 0, got {'video' if video is not None else 'batch'}="
                             f"{video if video is not None else batch}")
        self._start = start

    def _epoch_order(self) -> tuple[list[int], int]:
        """This epoch's video order from the requested start on, and that start (it applies to one iteration)."""
        start, self._start = self._start, 0
        return self.shard().tolist()[start:], start

    def shard(self) -> np.ndarray:
        """This shard's video indices for the current epoch (shuffled and padded in train mode)."""
        cfg = self.cfg
        return shard_indices(
            len(self.records), cfg.shard_id, cfg.num_shards, shuffle=cfg.sampled_for_training, seed=cfg.seed,
            epoch=self.epoch, pad=cfg.sampled_for_training,
        )

    def report(self) -> DataReport:
        """What was skipped or altered so far (missing entries are counted at construction)."""
        return self._report

    def __len__(self) -> int:
        n = len(self.shard())
        b = self.cfg.batch_size
        return n // b if (self.cfg.sampled_for_training and self.cfg.drop_last) else -(-n // b)

    def _event(self, reason: str, detail: str) -> None:
        self._report.add(reason, detail)
        if (reason, detail) not in self._warned:
            self._warned.add((reason, detail))
            warnings.warn(f"{reason}: {detail}" + ("" if reason in _ALTERED else "; skipped"), DataWarning,
                          stacklevel=3)


def _ignore_stop_signals(_worker_id: int) -> None:
    """In each DataLoader worker: ignore SIGTERM and SIGINT. torchrun, SLURM, systemd and a terminal's Ctrl-C
    signal the whole process group; a worker killed by it makes the loader raise in the main process before the
    trainer's own handler can write its checkpoint at the step boundary. The main process stops the workers
    when it is done (and a worker exits by itself when its parent dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PyAVClipLoader(_LoaderBase):
    """CPU loader: PyAV decoding in `cfg.workers` DataLoader worker processes. Iterate for one epoch."""

    decoder_name = "pyav"  # what decoded the clips (cfg.decoder "auto" resolved), for records of results

    _cached_dataset: _ClipDataset | None = None

    def __iter__(self) -> Iterator[Batch]:
        cfg = self.cfg
        if cfg.cache:
            # One dataset for the loader's lifetime, so the decoded videos stay cached across epochs.
            if self._cached_dataset is None:
                self._cached_dataset = _ClipDataset(self.records, cfg, self.stride)
            dataset = self._cached_dataset
        else:
            dataset = _ClipDataset(self.records, cfg, self.stride)
        dataset.epoch = self.epoch
        order, start = self._epoch_order()
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=order,
            num_workers=0 if cfg.cache else cfg.workers,
            collate_fn=_collate,
            drop_last=cfg.sampled_for_training and cfg.drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
        )
        for i, raw in enumerate(loader):
            read = start + min((i + 1) * cfg.batch_size, len(order))  # positions read so far, failures included
            for reason, detail in raw["events"]:
                self._event(reason, detail)
            for reason, detail in raw["errors"]:
                self._event(reason, detail)
            if raw["clips"] is None:
                continue
            self._report.clips += len(raw["clip_index"])
            yield _make_batch(self.records, raw["clips"], raw["video_index"], raw["clip_index"], read, raw["views"])
        self.epoch += 1


class DaliClipLoader(_LoaderBase):
    """DALI loader: files probed once (threads), clips decoded by `DaliClipDecoder` on cfg.device."""

    decoder_name = "dali"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        from stpcore.data.decode_dali import DaliClipDecoder, dali_codecs, decoder_for_env

        self.device = decoder_for_env(None if cfg.device == "auto" else cfg.device)
        self.codecs = dali_codecs(self.device)
        views = 1 if cfg.sampled_for_training else TEST_CLIPS * TEST_CROPS
        self.decoder = DaliClipDecoder(
            self.device, max_batch=cfg.batch_size * views, num_threads=max(cfg.workers, 1),
            short_side=cfg.short_side, crop=cfg.crop, mean=cfg.mean, std=cfg.std,
            device_id=torch.cuda.current_device() if self.device == "cuda" else 0,
        )
        self._probe_cache: dict[str, VideoInfo | VideoError] = {}
        self._turns: dict[str, int] = {}  # quarter turns of each video's display rotation (its first frame's)

    def _probe_all(self, indices: Sequence[int]) -> None:
        from stpcore.data.decode_pyav import first_frame_turns

        todo = [self.records[i].path for i in indices if str(self.records[i].path) not in self._probe_cache]

        def one(path: Path) -> None:
            try:
                _probe_cached(path, self._probe_cache)
                self._turns[str(path)] = first_frame_turns(path)  # DALI's decoder ignores the rotation: PyAV reads it
            except VideoError:
                pass

        with ThreadPoolExecutor(max(self.cfg.workers, 1)) as pool:
            list(pool.map(one, todo))

    def __iter__(self) -> Iterator[Batch]:
        from stpcore.data.decode_dali import DaliItem

        cfg = self.cfg
        order, start = self._epoch_order()
        self._probe_all(order)
        pending: list[tuple[int, DaliItem]] = []
        videos = 0

        def flush(read: int) -> Batch | None:
            clips, kept, failed = self.decoder.decode([it for _, it in pending])
            bad_videos = {}
            for i, msg in failed:
                bad_videos[pending[i][0]] = msg
            for vi, msg in bad_videos.items():
                self._event("decode error", f"{self.records[vi].path}: {msg}")
            # A test video is either complete (all 15 views) or dropped, so per-video averages stay honest.
            keep = [k for k in kept if pending[k][0] not in bad_videos]
            if not keep:
                return None
            if len(keep) != len(kept):
                clips = clips[[kept.index(k) for k in keep]]
            self._report.clips += len(keep)
            return _make_batch(
                self.records, clips, [pending[k][0] for k in keep], [pending[k][1].spec.clip_index for k in keep],
                read, [view_window(pending[k][1].spec, *resized_size(*pending[k][1].upright_size, cfg.short_side),
                                   cfg.crop) for k in keep],
            )

        for position, vi in enumerate(order, start + 1):  # position: videos read after this one
            rec = self.records[vi]
            try:
                info = _probe_cached(rec.path, self._probe_cache)
            except VideoError as e:
                self._event(e.reason, str(e))
                continue
            if info.codec not in self.codecs:
                self._event(f"codec not decodable by DALI-{self.device}", f"{rec.path} ({info.codec})")
                continue
            specs = _video_specs(cfg, self.stride, info, vi, self.epoch)
            if specs[0].short:
                self._event("short video, looped",
                            f"{rec.path} ({info.num_frames} frames < {clip_span(cfg.num_frames, self.stride)})")
            turns = self._turns.get(str(rec.path), 0)  # turned upright in the pipeline, as PyAV shows it
            pending.extend((vi, DaliItem(rec.path, info.height, info.width, s, turns)) for s in specs)
            videos += 1
            if videos == cfg.batch_size:
                batch = flush(position)
                pending, videos = [], 0
                if batch is not None:
                    yield batch
        if pending and not (cfg.sampled_for_training and cfg.drop_last):
            batch = flush(start + len(order))
            if batch is not None:
                yield batch
        self.epoch += 1


def resolve_decoder(cfg: DataConfig) -> str:
    """'dali' or 'pyav' for a config: "auto" picks DALI when it is installed and a CUDA GPU is usable."""
    if cfg.decoder in ("pyav", "dali"):
        return cfg.decoder
    if cfg.decoder != "auto":
        raise ValueError(f"decoder must be 'auto', 'pyav' or 'dali', got {cfg.decoder!r}")
    from stpcore.data.decode_dali import dali_available

    use_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return "dali" if use_gpu and dali_available() else "pyav"


def get_loader(cfg: DataConfig) -> PyAVClipLoader | DaliClipLoader:
    """The loader for `cfg`: DALI on a GPU (when installed), PyAV on CPU, unless cfg.decoder names one.

    Iterating yields `Batch`es for one epoch (then the epoch advances); `report()` tells what was skipped.
    """
    return DaliClipLoader(cfg) if resolve_decoder(cfg) == "dali" else PyAVClipLoader(cfg)
