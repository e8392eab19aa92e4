"""Progress for long jobs: a redrawn bar on a terminal, one plain line per task elsewhere.

A tqdm bar redraws itself with carriage returns; captured in a log (CI, ``make demo > log``, a cluster job)
that is hundreds of kilobytes of partial lines. So :func:`progress` gives a tqdm bar only when the stream it
writes to is a terminal (and tqdm is installed), and otherwise a :class:`LineProgress` that prints a single
line when the task ends ("phase1 epoch 3/30: 8/8 in 4.1 s, loss=0.412"), plus one every ``every`` steps
for tasks that take long.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class LineProgress:
    """tqdm's update / set_postfix / close, printed as plain lines.

    Args:
        total: steps expected.
        desc: what is being done.
        initial: steps already done (a resumed epoch).
        every: also print a line every this many steps (0: only at the end).
        file: where to print (stderr, as tqdm).
    """

    def __init__(self, total: int, desc: str, initial: int = 0, every: int = 0, file: TextIO | None = None,
                 unit: str = "") -> None:
        self.total, self.desc, self.n, self.every = total, desc, initial, every
        self.unit = f" {unit}" if unit else ""
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self.start = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.every and self.n % self.every == 0 and self.n < self.total:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self) -> None:
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total}{self.unit} in {time.perf_counter() - self.start:.1f} s{tail}",
              file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line()


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(total: int, desc: str, *, initial: int = 0, every: int = 0, unit: str = "", leave: bool = False,
             file: TextIO | None = None):
    """A tqdm bar on a terminal, else a :class:`LineProgress` (same methods: update, set_postfix, close)."""
    stream = file if file is not None else sys.stderr
    if is_terminal(stream):
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc=desc, unit=unit or "it", leave=leave, file=stream)
        except ImportError:
            pass
    return LineProgress(total, desc, initial=initial, every=every, file=stream, unit=unit)
