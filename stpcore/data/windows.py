"""Covering a frame with the model's square windows, and stitching their outputs back (full-frame anonymization).

A frame at the working scale (``data.preprocess``) is H x W; the model sees ``window`` x ``window``. Along each
side the windows are the fewest that cover it with at least ``min_overlap`` pixels shared by neighbours,
spread evenly from one edge to the other, so no window leaves the frame and no pixel is left out. Where
neighbours overlap, each pixel is taken from the window whose edge is farther from it: the seam runs
through the middle of the overlap, and every pixel has exactly one owner. A side shorter than the window
is padded at its end (bottom, right) up to the window, and the padding is cut off again after stitching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stpcore.data.sampling import crop_origin


def window_starts(length: int, window: int, min_overlap: int = 0) -> tuple[int, ...]:
    """Origins of the windows covering ``length`` pixels: (0,) when one window covers it (padded if shorter),
    else the fewest windows whose neighbours share at least ``min_overlap`` pixels, from 0 to length - window."""
    if length < 1 or window < 1:
        raise ValueError(f"window_starts: length and window must be >= 1, got {length} and {window}")
    if not 0 <= min_overlap < window:
        raise ValueError(f"window_starts: min_overlap must be in [0, {window}), got {min_overlap}")
    if length <= window:
        return (0,)
    n = math.ceil((length - min_overlap) / (window - min_overlap))
    n = max(n, 2)
    return tuple(round(i * (length - window) / (n - 1)) for i in range(n))


def owned_spans(starts: tuple[int, ...], window: int, length: int) -> tuple[tuple[int, int], ...]:
    """[begin, end) of the pixels each window owns: the seam between neighbours is the middle of their overlap,
    the first window owns from 0, the last up to ``length``. The spans tile [0, length) exactly."""
    seams = [(starts[i + 1] + starts[i] + window) // 2 for i in range(len(starts) - 1)]
    bounds = [0, *seams, length]
    return tuple((bounds[i], bounds[i + 1]) for i in range(len(starts)))


@dataclass(frozen=True)
class WindowGrid:
    """The windows covering one frame size.

    Attributes:
        height, width: the frame (working scale) before padding.
        window: the model's square input side.
        ys, xs: window origins along each side (in the padded frame).
        span_y, span_x: [begin, end) each window row / column owns (see :func:`owned_spans`).
        pad: (bottom, right) pixels added so that a side shorter than the window holds one window.
    """

    height: int
    width: int
    window: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    span_y: tuple[tuple[int, int], ...]
    span_x: tuple[tuple[int, int], ...]
    pad: tuple[int, int]

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(y, x) of every window, row-major: the order of the windows in batches and keep masks."""
        return [(y, x) for y in self.ys for x in self.xs]

    @property
    def owned(self) -> list[tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) each window owns, in :attr:`origins` order."""
        return [(*sy, *sx) for sy in self.span_y for sx in self.span_x]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)


def window_grid(height: int, width: int, window: int, min_overlap: int = 0) -> WindowGrid:
    """The :class:`WindowGrid` covering a ``height`` x ``width`` frame."""
    ys, xs = window_starts(height, window, min_overlap), window_starts(width, window, min_overlap)
    return WindowGrid(height, width, window, ys, xs, owned_spans(ys, window, height), owned_spans(xs, window, width),
                      pad=(max(window - height, 0), max(window - width, 0)))


def centre_window(height: int, width: int, window: int) -> WindowGrid:
    """One window at the centre of the frame (``--view center``): the evaluation's centre view (the same origin as
    ``sampling.crop_origin(side, window, 0.5)``); it owns only itself and nothing else is written."""
    y, x = crop_origin(height, window, 0.5), crop_origin(width, window, 0.5)
    ph, pw = max(window - height, 0), max(window - width, 0)
    return WindowGrid(height, width, window, (y,), (x,), ((y, y + window - ph),), ((x, x + window - pw),), (ph, pw))
