"""Window arithmetic of full-frame anonymization: coverage, seams, padding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stpcore.data.sampling import crop_origin
from stpcore.data.windows import centre_window, owned_spans, window_grid, window_starts

CASES = [(length, window, overlap)
         for window in (8, 32, 112)
         for length in range(1, 4 * window + 3, max(window // 8, 1))
         for overlap in (0, 1, window // 4, window - 1)]


def test_windows_cover_the_side_with_the_fewest_evenly_spread():
    for length, window, overlap in CASES:
        _check_starts(length, window, overlap)


def _check_starts(length, window, overlap):
    starts = window_starts(length, window, overlap)
    if length <= window:
        assert starts == (0,)
        return
    assert starts[0] == 0 and starts[-1] == length - window  # no window leaves the frame
    assert all(b > a for a, b in zip(starts, starts[1:], strict=False))
    assert all(a + window - b >= overlap for a, b in zip(starts, starts[1:], strict=False))
    n = len(starts)
    # one window fewer, spread as evenly as possible, could not keep the overlap
    assert n == 2 or math.ceil((length - window) / (n - 2)) > window - overlap
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1  # evenly spread


def test_every_pixel_has_exactly_one_owner_inside_its_window():
    for length, window, overlap in CASES:
        _check_owners(length, window, overlap)


def _check_owners(length, window, overlap):
    starts = window_starts(length, window, overlap)
    spans = owned_spans(starts, window, length)
    count = np.zeros(length, dtype=int)
    for (a, b), s in zip(spans, starts, strict=True):
        assert s <= a < b <= s + window
        count[a:b] += 1
    assert (count == 1).all()
    # Each pixel comes from the covering window whose edge is farthest from it (up to one pixel at the seam).
    for x in range(length):
        owner = next(i for i, (a, b) in enumerate(spans) if a <= x < b)
        margin = [min(x - s, s + window - 1 - x) for s in starts if s <= x < s + window]
        mine = min(x - starts[owner], starts[owner] + window - 1 - x)
        assert mine >= max(margin) - 1


def test_bad_window_arguments_are_refused():
    with pytest.raises(ValueError, match="min_overlap"):
        window_starts(100, 32, 32)
    with pytest.raises(ValueError, match=">= 1"):
        window_starts(0, 32)


def test_a_side_shorter_than_the_window_is_padded_at_its_end():
    g = window_grid(20, 70, 32)
    assert g.pad == (12, 0) and g.ys == (0,) and g.span_y == ((0, 20),)
    assert g.xs == (0, 19, 38) and g.span_x[-1][1] == 70
    assert len(g) == 3 and g.origins == [(0, 0), (0, 19), (0, 38)]
    tiny = window_grid(10, 12, 32)
    assert tiny.pad == (22, 20) and tiny.owned == [(0, 10, 0, 12)]


@pytest.mark.parametrize("height, width", [(128, 171), (171, 128), (37, 49), (128, 128), (20, 40)])
def test_centre_window_is_the_evaluations_centre_view(height, width):
    g = centre_window(height, width, 32 if height < 100 else 112)
    w = g.window
    assert g.origins == [(crop_origin(height, w, 0.5), crop_origin(width, w, 0.5))]
    y, x = g.origins[0]
    assert g.owned == [(y, y + min(w, height), x, x + min(w, width))]
