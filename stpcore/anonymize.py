"""Anonymize whole video files with a trained STPrivacy model (``stpcore anonymize``).

Each input is decoded frame by frame, upright as players show it (a display rotation, as phones write for portrait
video, is applied: :func:`stpcore.media.upright_rgb`), and brought to the working scale the model was trained and
evaluated at (``stpcore.data.preprocess``: short side 8/7 of the model's image size, antialiased bilinear). Then:

- ``view="full"`` (the default): the whole frame is covered by model windows (``stpcore.data.windows``: the
  fewest square windows that cover it, spread evenly; seams in the middle of each overlap, every pixel
  from exactly one window); each window is anonymized and the outputs are stitched back into the frame.
  The windows of several clips run in one batch.
- ``view="center"``: only the centre window (the evaluation's centre view) is anonymized and written.

Frames are cut into clips of ``num_frames`` frames taken ``stride`` apart; with a stride s > 1 the s
interleaved phases of a chunk are processed as separate clips, so every frame of the video is anonymized and
the output keeps the source's frame rate, length and each frame's time (variable-frame-rate video, as phones
record, keeps its timing). The last partial chunk is padded by repeating its last frame; padded outputs are
discarded, and so are the keep masks of phases that hold only padding. Windows are
collected over chunks until they fill whole batches of ``batch_size``. A frame side shorter than the window
(only possible with a ``short_side`` below the model's image size) is padded at its end with the mean colour
(0 after the normalisation) and cut off again; the padding is recorded in the keep file.

The output is written at the working scale, or with ``output_size="source"`` (full view only) resized to
the source's size (bilinear; the dropped-pixel mask is resized by nearest neighbour, so dropped tubelets
stay exactly black in the frames handed to the encoder; the lossy H.264 file decodes with compression noise in
them, strongest near their edges; the keep file holds the exact masks).

Outputs per input, named after it (``<stem>``, made unique within one run; see :func:`output_paths`):
- ``<stem>.anonymized.mp4``: the anonymized video (dropped tubelets black);
- ``<stem>.keep.npz``: ``keep`` uint8 (clips, windows, N) masks in t-major tubelet order; ``start`` and
  ``phase`` of each clip (first source frame, stride phase); ``window`` (windows, 2) each window's (y, x)
  origin and ``owned`` (windows, 4) the (y0, y1, x0, x1) it contributes, in working-scale pixels of the
  padded frame; ``window_size``, ``work_size`` (H, W), ``source_size`` (H, W), ``video_size`` (H, W) of the written
  video (the output size rounded up to even, by repeating the last row or column), ``pad`` (bottom, right),
  ``view``, ``output_size``, ``stride``, ``grid``, ``tubelet``; and the record of what the outputs were made
  from: ``source`` (the input's resolved path), ``source_bytes`` and ``source_mtime_ns`` (its size and
  modification time when it was read), ``settings`` (JSON: :func:`output_settings`) and ``outputs`` (JSON: name
  -> [bytes, mtime_ns] of each video written with it);
- ``<stem>.side_by_side.mp4`` on request: the input (at the output's size and view) and the output.
A file that cannot be read is reported and skipped; the others are still written.

A later run into the same folder replaces an input's own outputs (or, with ``skip_existing``, leaves them when
its record shows the same unchanged input, the same settings and the same videos), but never outputs of the same
name made from another input, or with no record to tell: that input is reported as failed, and the fix is
another output folder or removing the old outputs.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import json
import os
import re
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stpcore import media
from stpcore.config import debug_enabled
from stpcore.data.preprocess import normalize, to_working_scale, working_short_side
from stpcore.data.windows import WindowGrid, centre_window, window_grid
from stpcore.tubelets import keep_to_pixels

VIEWS = ("full", "center")
OUTPUT_SIZES = ("work", "source")


class ModelError(RuntimeError):
    """The anonymizer itself failed (compiling, exporting, loading its runtime, out of memory), not an input: every
    input would fail the same way, so a run stops at the first (``report``: what was finished before it)."""

    report: AnonymizeReport | None = None


def _model_hint(anonymizer, exc: BaseException) -> str:
    """What to change when the model cannot run, from what failed."""
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory: a smaller batch (--batch-size) or another device (--device)"
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return ("torch.compile failed: run without --compile (compile=False), or install what it needs (a C++ compiler "
                "for the CPU; STPCORE_DEBUG=1 shows the traceback)")
    if getattr(anonymizer, "runtime", "torch") != "torch":
        return f"the {anonymizer.runtime} runtime failed: try --runtime torch"
    return "STPCORE_DEBUG=1 shows the traceback"


def model_error(anonymizer, exc: BaseException, what: str) -> ModelError:
    """A :class:`ModelError` for ``exc``, raised by the anonymizer while ``what``."""
    detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
    return ModelError(f"the model failed {what} (not the input: every input would fail alike): {detail}; "
                      f"{_model_hint(anonymizer, exc)}")


def _is_setting_error(exc: BaseException) -> bool:
    """A ValueError about a setting (keep ratio, threshold): its own message says what to change. An ONNX runtime
    that cannot load its graph raises a ValueError too, but that is the model failing."""
    from stpcore.inference import RuntimeLoadError

    return isinstance(exc, ValueError) and not isinstance(exc, RuntimeLoadError)


def prepare_model(anonymizer, batch_sizes: int | Iterable[int], keep_ratio: float | None = None,
                  adaptive_threshold: float | None = None) -> float:
    """``anonymizer.prepare`` (:meth:`stpcore.inference.ClipAnonymizer.prepare`: export, load or compile now) when it
    has one; its failure is a :class:`ModelError`. Returns the seconds it took."""
    prepare = getattr(anonymizer, "prepare", None)
    if prepare is None:
        return 0.0
    try:
        return prepare(batch_sizes, keep_ratio=keep_ratio, adaptive_threshold=adaptive_threshold)
    except Exception as exc:  # noqa: BLE001 - compilers and runtimes raise their own types
        if _is_setting_error(exc):
            raise
        raise model_error(anonymizer, exc, "while it was prepared") from exc


@dataclass
class AnonymizeReport:
    """What :func:`anonymize_files` did with each input.

    Attributes:
        written: input -> the paths written for it.
        failed: input -> why it could not be anonymized (the other inputs were still processed).
        skipped: (input, why) for inputs not processed: given twice, or already done (``skip_existing``).
    """

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"anonymized {len(self.written)} file(s), failed {len(self.failed)}, skipped {len(self.skipped)}"]
        lines += [f"  ok      {src} -> {', '.join(str(p) for p in outs)}" for src, outs in self.written.items()]
        lines += [f"  FAILED  {src}: {why}" for src, why in self.failed.items()]
        lines += [f"  skipped {src}: {why}" for src, why in self.skipped]
        return "\n".join(lines)


def _chunks(frames: Iterator[tuple[np.ndarray, float]], length: int
            ) -> Iterator[tuple[int, np.ndarray, int, np.ndarray]]:
    """Timed frames (:func:`stpcore.media.read_timed_frames`) -> (start, frames (length, H, W, 3) padded by repeating
    the last frame, number of real frames, the real frames' times)."""
    buf, times, start, first = [], [], 0, None
    for i, (f, t) in enumerate(frames):
        if first is None:
            first = f.shape
        elif f.shape != first:
            raise ValueError(f"the frame size changes mid-video, at frame {i} ({first[1]}x{first[0]} to "
                             f"{f.shape[1]}x{f.shape[0]}); transcode it to one size first")
        buf.append(f)
        times.append(t)
        if len(buf) == length:
            yield start, np.stack(buf), length, np.array(times)
            start += length
            buf, times = [], []
    if buf:
        real = len(buf)
        buf += [buf[-1]] * (length - real)
        yield start, np.stack(buf), real, np.array(times)


def plan_windows(height: int, width: int, window: int, view: str = "full", min_overlap: int = 0) -> WindowGrid:
    """The windows of a frame at the working scale for ``view`` ("full" or "center")."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return window_grid(height, width, window, min_overlap) if view == "full" else centre_window(height, width, window)


@dataclass
class Stitched:
    """One chunk after :meth:`WindowAnonymizer.run`.

    Attributes:
        frames: uint8 (L, h, w, 3): the output over the view's region (full: the whole working-scale frame).
        visible: bool (L, h, w): False where the owning window dropped the tubelet (those pixels are 0).
        keep: uint8 (stride, windows, N) keep masks, phase-major.
    """

    frames: np.ndarray
    visible: np.ndarray
    keep: np.ndarray


class WindowAnonymizer:
    """Anonymize chunks of working-scale frames window by window and stitch the results (no file I/O; the GPU
    benchmark drives it directly).

    Args:
        anonymizer: ``anonymizer(clips, keep_ratio=..., adaptive_threshold=...)`` as in :func:`anonymize_file`.
        grid: the windows (:func:`plan_windows`), whose side must be the model's image size.
        stride, batch_size, keep_ratio, adaptive_threshold, mean, std: as in :func:`anonymize_file`.
    """

    def __init__(self, anonymizer, grid: WindowGrid, *, stride: int = 1, batch_size: int = 8,
                 keep_ratio: float | None = None, adaptive_threshold: float | None = None,
                 mean=media.IMAGENET_MEAN, std=media.IMAGENET_STD) -> None:
        cfg = anonymizer.cfg
        if grid.window != cfg.image_size:
            raise ValueError(f"the windows are {grid.window} px but the model takes {cfg.image_size}")
        self.anonymizer, self.grid, self.stride, self.batch_size = anonymizer, grid, stride, batch_size
        self.kwargs = {"keep_ratio": keep_ratio, "adaptive_threshold": adaptive_threshold}
        self.mean, self.std = mean, std
        self.num_frames, self.tubelet_grid, self.tubelet = cfg.num_frames, cfg.grid, cfg.tubelet
        owned = grid.owned
        self.box = (min(o[0] for o in owned), max(o[1] for o in owned), min(o[2] for o in owned),
                    max(o[3] for o in owned))

    def run(self, chunks: list[torch.Tensor]) -> list[Stitched]:
        """chunks: uint8 (L, 3, H, W) at the working scale, L = num_frames * stride -> one :class:`Stitched` each."""
        g, w, s = self.grid, self.grid.window, self.stride
        ph, pw = g.pad
        clips = []
        for work in chunks:
            if tuple(work.shape[-2:]) != (g.height, g.width) or work.shape[0] != self.num_frames * s:
                raise ValueError(f"chunk of shape {tuple(work.shape)}; the windows were planned for "
                                 f"({self.num_frames * s}, 3, {g.height}, {g.width})")
            x = normalize(work, self.mean, self.std)  # (3, L, H, W)
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph))  # the mean colour
            for p in range(s):
                xp = x[:, p::s]
                clips += [xp[:, :, y : y + w, x0 : x0 + w] for y, x0 in g.origins]
        videos, keeps = [], []
        for i in range(0, len(clips), self.batch_size):
            batch = torch.stack(clips[i : i + self.batch_size])
            try:
                with torch.no_grad():
                    result = self.anonymizer(batch, **self.kwargs)
            except Exception as exc:  # noqa: BLE001 - the clips are checked and in shape: the model failed
                if _is_setting_error(exc):  # a bad setting (keep ratio, threshold), said by the model
                    raise
                raise model_error(self.anonymizer, exc, f"on a batch of {len(batch)} windows") from exc
            videos.append(result.video.float().cpu())
            keeps.append(result.keep.cpu())
        video, keep = torch.cat(videos), torch.cat(keeps)
        masks = keep_to_pixels(keep.float(), self.tubelet_grid, self.tubelet)  # (n, 1, T, w, w)
        y0, y1, x0, x1 = self.box
        out, n = [], len(g)
        for c, work in enumerate(chunks):
            L = work.shape[0]
            frames = np.zeros((L, g.height + ph, g.width + pw, 3), dtype=np.uint8)
            visible = np.zeros((L, g.height + ph, g.width + pw), dtype=bool)
            for p in range(s):
                for k, ((oy, ox), (a, b, cc, d)) in enumerate(zip(g.origins, g.owned, strict=True)):
                    j = (c * s + p) * n + k
                    pixels = media.to_uint8(video[j], self.mean, self.std, mask=masks[j])  # (T, w, w, 3)
                    frames[p::s, a:b, cc:d] = pixels[:, a - oy : b - oy, cc - ox : d - ox]
                    visible[p::s, a:b, cc:d] = masks[j][0, :, a - oy : b - oy, cc - ox : d - ox].numpy() > 0
            k0 = c * s * n
            out.append(Stitched(frames[:, y0:y1, x0:x1], visible[:, y0:y1, x0:x1],
                                keep[k0 : k0 + s * n].reshape(s, n, -1).to(torch.uint8).numpy()))
        return out


def to_source_size(frames: np.ndarray, visible: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize stitched uint8 (L, h, w, 3) frames to ``height`` x ``width`` (bilinear, antialiased when shrinking);
    pixels whose nearest working-scale pixel was dropped are set to exactly 0."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                      antialias=height < frames.shape[1] or width < frames.shape[2])
    m = F.interpolate(torch.from_numpy(visible)[:, None].float(), size=(height, width), mode="nearest-exact")
    x = (x.round().clamp(0, 255) * m).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


# The arguments of anonymize_file that shape its output (batch_size and side_by_side do not).
_OUTPUT_SETTINGS = ("stride", "keep_ratio", "adaptive_threshold", "view", "output_size", "min_overlap", "short_side",
                    "mean", "std")


def check_view(view: str, output_size: str, min_overlap: int = 0) -> None:
    """ValueError unless ``view`` is one of VIEWS and ``output_size`` one of OUTPUT_SIZES, and a source-sized output
    or a window overlap comes with the full view."""
    if view not in VIEWS or output_size not in OUTPUT_SIZES:
        raise ValueError(f"view must be one of {VIEWS} and output_size one of {OUTPUT_SIZES}, got {view!r} and "
                         f"{output_size!r}")
    if output_size == "source" and view != "full":
        raise ValueError("output_size='source' needs view='full' (the centre view has no source-sized frame)")
    if min_overlap and view != "full":
        raise ValueError(f"min_overlap={min_overlap} applies to the full view's windows; view={view!r} is one window")


def output_settings(anonymizer, **kwargs) -> dict:
    """What shapes an output besides its input, as the keep file records it (JSON types): the settings of
    :func:`anonymize_file` among ``kwargs`` (defaults filled in, the working scale resolved), the model's config
    (its architecture), the SHA-256 of its float32 weights (``stpcore.deploy.weights_fingerprint``), so two
    checkpoints of one architecture are told apart, and the anonymizer's ``numerics`` (runtime, precision, device:
    :attr:`stpcore.inference.ClipAnonymizer.numerics`), with the batch size where the results depend on it (dynamic
    int8)."""
    params = inspect.signature(anonymize_file).parameters
    settings = {name: kwargs.get(name, params[name].default) for name in _OUTPUT_SETTINGS}
    cfg = anonymizer.cfg
    settings["short_side"] = settings["short_side"] or working_short_side(cfg.image_size)
    meta = getattr(anonymizer, "onnx_meta", None)  # a given ONNX graph runs at the keep ratio it was exported at
    if settings["keep_ratio"] is None and settings["adaptive_threshold"] is None and meta:
        settings["keep_ratio"] = meta["keep_ratio"]
    settings["model"] = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg)
    fingerprint = getattr(anonymizer, "weights_fingerprint", None)
    if fingerprint is None and isinstance(anonymizer, torch.nn.Module):
        from stpcore.deploy import weights_fingerprint

        fingerprint = weights_fingerprint(anonymizer)
    settings["weights"] = fingerprint
    numerics = getattr(anonymizer, "numerics", None)  # runtime, precision, device (ClipAnonymizer)
    if numerics is not None:
        settings["numerics"] = numerics
        if numerics.get("batch_dependent"):  # dynamic int8: a clip's result depends on its batch
            settings["batch_size"] = kwargs.get("batch_size", params["batch_size"].default)
    return json.loads(json.dumps(settings, default=str))


def _stamp(path: Path) -> list[int]:
    """[bytes, mtime_ns] of a file: what a record keeps of the files it names, to notice one changed or replaced."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _save_npz(path: Path, **arrays) -> None:
    """np.savez_compressed, atomically (a temporary name, then a rename)."""
    with media.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def read_record(keep_path: str | os.PathLike) -> dict | None:
    """The record in a keep file (``source``, ``source_bytes``, ``source_mtime_ns``, ``settings``, ``outputs``; see
    the module docstring), or None when there is no file, it cannot be read, or it predates records (an older
    stpcore)."""
    try:
        with np.load(keep_path, allow_pickle=False) as saved:  # reads only the members asked for
            return {"source": str(saved["source"]), "source_bytes": int(saved["source_bytes"]),
                    "source_mtime_ns": int(saved["source_mtime_ns"]), "settings": json.loads(str(saved["settings"])),
                    "outputs": json.loads(str(saved["outputs"]))}
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, ValueError):  # missing, damaged, or no record in it
        return None


def anonymize_file(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    anonymizer: Callable[..., object],
    *,
    stride: int = 1,
    batch_size: int = 8,
    keep_ratio: float | None = None,
    adaptive_threshold: float | None = None,
    side_by_side: bool = False,
    view: str = "full",
    output_size: str = "work",
    min_overlap: int = 0,
    short_side: int | None = None,
    stem: str | None = None,
    mean=media.IMAGENET_MEAN,
    std=media.IMAGENET_STD,
) -> list[Path]:
    """Anonymize one video file; returns the paths written (see the module docstring).

    ``anonymizer(clips, keep_ratio=..., adaptive_threshold=...)`` takes normalised float clips
    (B, 3, T, H, W) and returns an object with ``video`` (B, 3, T, H, W) and ``keep`` (B, N); its ``cfg`` (an
    :class:`~stpcore.models.STPrivacyConfig`: an ``STPrivacy`` or a ``ClipAnonymizer``) gives the clip size
    (``num_frames``, ``image_size``) and the tubelet grid (``grid``, ``tubelet``).

    Args:
        view: "full" (the whole frame, in windows) or "center" (the centre window only).
        output_size: "work" (the working scale) or "source" (the source's size; full view only).
        min_overlap: least overlap in pixels between neighbouring windows (full view).
        short_side: the working scale's short side (default: the one the model was trained at, 8/7 of its
            image size; another value shows the model objects at a scale it was not trained on).
        batch_size: windows per forward.
    """
    cfg = anonymizer.cfg
    num_frames, image_size = cfg.num_frames, cfg.image_size
    if stride < 1 or batch_size < 1:
        raise ValueError(f"stride and batch_size must be >= 1, got stride={stride}, batch_size={batch_size}")
    check_view(view, output_size, min_overlap)
    settings = output_settings(anonymizer, stride=stride, keep_ratio=keep_ratio, adaptive_threshold=adaptive_threshold,
                               view=view, output_size=output_size, min_overlap=min_overlap, short_side=short_side,
                               mean=mean, std=std, batch_size=batch_size)
    short_side = short_side or working_short_side(image_size)
    path, out_dir = Path(path), Path(out_dir)
    stem = stem or path.stem
    fps = media.video_fps(path)
    source_bytes, source_mtime_ns = _stamp(path)  # before the frames are read: a change while reading shows next time
    out_path, keep_path, sbs_path = output_paths(out_dir, stem, side_by_side=True)
    record = dict(source=str(path.resolve()), source_bytes=np.int64(source_bytes),
                  source_mtime_ns=np.int64(source_mtime_ns), settings=json.dumps(settings, sort_keys=True))
    keeps, starts, phases = [], [], []
    chunk_len = num_frames * stride
    runner: WindowAnonymizer | None = None
    source: tuple[int, int] = (0, 0)
    with media.VideoWriter(out_path, fps) as writer, (
        media.VideoWriter(sbs_path, fps) if side_by_side else _NullWriter()
    ) as sbs:
        pending: list[tuple[int, np.ndarray | None, int, np.ndarray, torch.Tensor]] = []

        def flush() -> None:
            for (start, chunk, real, times, work), res in zip(pending, runner.run([p[4] for p in pending]),
                                                              strict=True):
                out = res.frames
                if output_size == "source":
                    out, shown = to_source_size(out, res.visible, *source), chunk
                else:
                    y0, y1, x0, x1 = runner.box
                    shown = work.permute(0, 2, 3, 1).numpy()[:, y0:y1, x0:x1]
                writer.write(out[:real], times=times)
                if side_by_side:
                    sbs.write(media.side_by_side(np.ascontiguousarray(shown[:real]), out[:real]), times=times)
                for p in range(min(stride, real)):  # a phase of only padding frames is not recorded
                    keeps.append(res.keep[p])
                    starts.append(start + p)
                    phases.append(p)
            pending.clear()

        for start, chunk, real, times in _chunks(media.read_timed_frames(path), chunk_len):
            work = to_working_scale(chunk, short_side)
            if runner is None:
                source = chunk.shape[1:3]
                grid = plan_windows(*work.shape[-2:], image_size, view, min_overlap)
                runner = WindowAnonymizer(anonymizer, grid, stride=stride, batch_size=batch_size,
                                          keep_ratio=keep_ratio, adaptive_threshold=adaptive_threshold,
                                          mean=mean, std=std)
            # The source-size frames are kept only where they are shown (the side-by-side at the source's size): held
            # for every chunk until its batches fill, they were most of the memory (16 frames of 1080p: 100 MB each).
            pending.append((start, chunk if side_by_side and output_size == "source" else None, real, times, work))
            if len(pending) * stride * len(runner.grid) % batch_size == 0:  # whole batches only, until the end
                flush()
        if pending:
            flush()
        # Every frame is encoded; the videos are renamed into place as this block ends. Their record comes first,
        # naming no videos yet: a run stopped between those renames and the final keep file leaves outputs that
        # still say which input they belong to, and they are redone on resume.
        _save_npz(keep_path, **record, outputs=json.dumps({}))
    g = runner.grid
    # The videos are in place: the record stamps them, so a video replaced after its record (a run stopped
    # between the renames) does not pass for the one the record describes.
    videos = [out_path] + ([sbs_path] if side_by_side else [])
    _save_npz(keep_path, keep=np.stack(keeps), start=np.array(starts), phase=np.array(phases), stride=stride,
              grid=np.array(cfg.grid), tubelet=np.array(cfg.tubelet), window=np.array(g.origins),
              owned=np.array(g.owned), window_size=g.window, work_size=np.array([g.height, g.width]),
              source_size=np.array(source), pad=np.array(g.pad), view=view, output_size=output_size,
              video_size=np.array(writer.size[::-1]), **record,
              outputs=json.dumps({v.name: _stamp(v) for v in videos}))
    return [out_path, keep_path] + ([sbs_path] if side_by_side else [])


class _NullWriter:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def write(self, frames) -> None:
        pass


def _unique_stems(paths: Sequence[Path], out_dir: Path | None = None) -> list[str]:
    """One output name per input: the name of its own earlier outputs in ``out_dir`` (a keep file whose record names
    this input), else its stem, or ``<stem>-N`` with the smallest N whose name is still free (so a.mp4, a.webm and
    a-1.mp4 get a, a-1 and a-1-1, never the same name twice). Earlier outputs keep their names whatever the order
    the inputs come in this time."""
    claimed: dict[int, str] = {}
    if out_dir is not None:
        for i, p in enumerate(paths):
            source = str(p.resolve())
            for keep in sorted(out_dir.glob(f"{glob.escape(p.stem)}*.keep.npz")):
                name = keep.name[: -len(".keep.npz")]
                if name in claimed.values() or not re.fullmatch(re.escape(p.stem) + r"(-\d+)*", name):
                    continue
                record = read_record(keep)
                if record is not None and record["source"] == source:
                    claimed[i] = name
                    break
    taken = set(claimed.values())
    stems = []
    for i, p in enumerate(paths):
        if i in claimed:
            stems.append(claimed[i])
            continue
        stem, n = p.stem, 0
        while stem in taken:
            n += 1
            stem = f"{p.stem}-{n}"
        taken.add(stem)
        stems.append(stem)
    return stems


def output_paths(out_dir: str | os.PathLike, stem: str, side_by_side: bool = False) -> list[Path]:
    """The files :func:`anonymize_file` writes for ``stem``: video, keep masks (and side by side)."""
    out_dir = Path(out_dir)
    names = [f"{stem}.anonymized.mp4", f"{stem}.keep.npz"] + ([f"{stem}.side_by_side.mp4"] if side_by_side else [])
    return [out_dir / n for n in names]


def prepare_output_dir(out_dir: str | os.PathLike) -> Path:
    """Create the output folder; a clear ValueError when it cannot be one (an existing file, no permission)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is an existing file; give a folder path with -o")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from exc
    try:  # an existing folder may still refuse files (permissions, a read-only mount): say so before any work
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".stpcore-write-check-"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write in the output folder {out_dir}: {exc.strerror or exc}; give a folder you "
                         f"can write with -o") from exc
    return out_dir


def _previous_outputs(out_dir: Path, stem: str, source: Path, path: Path) -> dict | None:
    """The record of the outputs already named ``stem`` in ``out_dir``, or None when there are none; a ValueError
    when they were made from another input than ``source`` (``path`` resolved), or have no record to tell."""
    present = [o for o in output_paths(out_dir, stem, side_by_side=True) if o.exists()]
    if not present:
        return None
    record = read_record(out_dir / f"{stem}.keep.npz")
    if record is not None and record["source"] == str(source):
        return record
    if record is None:
        held = (f"{present[0]} is already there with no record of its input ({stem}.keep.npz is missing, damaged "
                f"or from an older stpcore)")
    else:
        held = f"{present[0]} was made from {record['source']}, another input with the same name"
    raise ValueError(f"output name taken: {held}, so {path} is not written over it; write {path} to another -o "
                     f"folder, or remove {', '.join(o.name for o in present)} from {out_dir} first")


def _is_current(record: dict, path: Path, outs: list[Path], settings: dict) -> bool:
    """Whether ``record`` describes ``outs`` made from ``path`` as it is now, with ``settings``."""
    try:
        if _stamp(path) != [record["source_bytes"], record["source_mtime_ns"]] or record["settings"] != settings:
            return False
        return all(o.suffix == ".npz" or record["outputs"].get(o.name) == _stamp(o) for o in outs)
    except OSError:  # the input or an output is gone
        return False


def _why(exc: Exception) -> str:
    from stpcore.data.decode_pyav import VideoError

    if isinstance(exc, VideoError):
        hint = {"missing file": "check the path", "empty file": "the file has no data",
                "unreadable": "FFmpeg cannot read it: damaged, or not a video",
                "no video stream": "the file holds no video (audio only?)", "no frames": "the video has no frames",
                "not a video": "a text file, not a video"}
        return f"{exc.reason}" + (f" ({exc.detail})" if exc.detail else "") + (
            f": {hint[exc.reason]}" if exc.reason in hint else "")
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


class _FirstBatch(BaseException):  # noqa: N818 - a signal, not an error: past WindowAnonymizer's model-error wrapper
    def __init__(self, clips: torch.Tensor) -> None:
        super().__init__("the first batch")
        self.clips = clips


class _Capture:
    """Stands in for an anonymizer and stops anonymize_file at the first batch it is given (``_FirstBatch``)."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, clips, **kw):
        raise _FirstBatch(clips)


def _calibrate_on_first_input(anonymizer, paths: list[Path], kwargs: dict, verbose: bool) -> None:
    """OpenVINO int8 without calibration clips calibrates on the first batch it runs, and other clips quantize to
    another graph: a run resumed with ``skip_existing`` would quantize on the first input it had left, and its
    outputs would not be those of an uninterrupted run. So the run calibrates on the first batch of its first
    readable input in the order given (read here, written nowhere; the same batch an uninterrupted run gives it
    first), whether or not that input is done already; the records name the clips (their digest)."""
    for path in paths:
        try:
            with tempfile.TemporaryDirectory() as scratch:
                anonymize_file(path, scratch, _Capture(anonymizer), **kwargs)
        except _FirstBatch as first:
            clips = first.clips
            first.__traceback__ = None  # its frames hold the reader: the input's file closes before calibrate() runs
            anonymizer.calibrate(clips)
            if verbose:
                print(f"int8 calibrated on the first batch of {path} ({clips.shape[0]} clips)")
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # noqa: BLE001, S112 - unreadable: the next input; the run reports this one as it reaches it
            continue


def anonymize_files(paths: list[str | os.PathLike], out_dir: str | os.PathLike, anonymizer, *, verbose: bool = True,
                    skip_existing: bool = False, **kwargs) -> AnonymizeReport:
    """Anonymize several files (``kwargs``: those of :func:`anonymize_file`).

    A file that cannot be read or fails midway is reported in ``failed`` and the others are still written
    (each output appears only complete: written to a temporary name, then renamed). An input given twice
    (the same file) is processed once. An input's outputs from an earlier run are replaced, but outputs of the
    same name made from another input (or with no record of their input) are not: that input fails, with the
    paths and the fix. With ``skip_existing``, an input whose outputs all exist already and whose record shows
    this input unchanged (path, size, modification time) and the same settings (:func:`output_settings`) is
    skipped, so an interrupted run over the same inputs can be resumed, in any order (each input's earlier outputs
    keep their name: :func:`_unique_stems`); a changed input or other settings are done again. An anonymizer that
    wants calibration clips (OpenVINO int8 without them) is calibrated first on the first batch of the first readable
    input given (:func:`_calibrate_on_first_input`): a resume finds its inputs done only with the same first input.
    Ctrl-C / SIGTERM (KeyboardInterrupt) stops at once, leaving no partial file; the report filled so far is attached
    to the exception as ``exc.report``. So does a failure of the model itself
    (:class:`ModelError`: it could not compile, export, load its runtime, or ran out of memory), which would fail
    every input alike: the anonymizer is prepared (:func:`prepare_model`) before the first input that needs it, and
    a model failure stops the run instead of being reported once per input.
    """
    from stpcore.data.decode_pyav import probe

    report = AnonymizeReport()
    out_dir = prepare_output_dir(out_dir)
    paths = [Path(p) for p in paths]
    if getattr(anonymizer, "calibration_pending", False):
        _calibrate_on_first_input(anonymizer, paths, kwargs, verbose)
    settings = output_settings(anonymizer, **kwargs)
    seen: dict[Path, Path] = {}
    prepared = False
    try:
        for path, stem in zip(paths, _unique_stems(paths, out_dir), strict=True):
            key = path.resolve()
            if key in seen:
                report.skipped.append((str(path), f"the same file as {seen[key]}, given earlier"))
                continue
            seen[key] = path
            outs = output_paths(out_dir, stem, kwargs.get("side_by_side", False))
            try:
                record = _previous_outputs(out_dir, stem, key, path)
                if skip_existing and record is not None and _is_current(record, path, outs, settings):
                    report.skipped.append((str(path), f"already done ({outs[0]} exists; --skip-existing)"))
                    if verbose:
                        print(f"done already: {path} -> {outs[0]}")
                    continue
                if path.is_dir():
                    raise ValueError("a folder, not a video file; give the video files inside it")
                # A clear reason (missing, empty, unreadable, no video stream) before any output; a WebM/MKV is not
                # read whole to count its frames, which anonymizing does not need.
                probe(path, count_frames=False)
                if not prepared:
                    prepare_model(anonymizer, kwargs.get("batch_size", 8), kwargs.get("keep_ratio"),
                                  kwargs.get("adaptive_threshold"))
                    prepared = True
                report.written[str(path)] = anonymize_file(path, out_dir, anonymizer, stem=stem, **kwargs)
                if verbose:
                    print(f"ok: {path} -> {report.written[str(path)][0]}")
                stale = output_paths(out_dir, stem, side_by_side=True)[-1]
                if record is not None and not kwargs.get("side_by_side", False) and stale.exists():
                    stale.unlink()  # this input's side-by-side of an earlier run: it shows the replaced output
                    if verbose:
                        print(f"removed {stale}: it showed the earlier output of {path}")
            except (KeyboardInterrupt, SystemExit, ModelError):
                raise
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the others
                report.failed[str(path)] = _why(exc)
                if verbose:
                    print(f"failed {path}: {report.failed[str(path)]}", file=sys.stderr)  # as the summary counts it
                    if debug_enabled():
                        traceback.print_exc()
    except (KeyboardInterrupt, ModelError) as exc:
        exc.report = report
        raise
    return report
