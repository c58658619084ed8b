"""The status line of a long job, with its ETA: training's progress bar and `prepare`'s documents
and tokens line are both this class.

On a terminal the line is redrawn in place, at most every REDRAW_SECONDS (redrawing on every
step would cost a fast loop time in the terminal). Elsewhere (a log file, CI) a redrawn line
would be a mess of carriage returns, so it is printed as a new line every `log_every` seconds,
or not at all for a job that writes log lines of its own (training's step lines).
"""

from __future__ import annotations

import math
import time
from typing import TextIO

REDRAW_SECONDS = 0.5
BAR_WIDTH = 30


def hms(seconds: float) -> str:
    """`1:02:03`; `?` for an unknown (infinite) time."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def bar(fraction: float) -> str:
    """`[#####-----]`: `fraction` (0 to 1) of BAR_WIDTH."""
    n = int(BAR_WIDTH * min(max(fraction, 0.0), 1.0))
    return "[" + "#" * n + "-" * (BAR_WIDTH - n) + "]"


class Progress:
    """One status line on `stream`; `update(text, fraction)` appends the ETA.

    The ETA is the rate since the line was created: a job resumed at `start_fraction` counts only
    what it did itself. `enabled=False` (another process of the job shows it, or a quiet run)
    prints nothing.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        log_every: float | None,
        start_fraction: float = 0.0,
        enabled: bool = True,
    ):
        self.stream = stream
        self.tty = enabled and stream.isatty()
        self.every = REDRAW_SECONDS if self.tty else log_every if enabled else None
        self.t0, self.f0, self.last = time.time(), start_fraction, -math.inf

    def eta(self, fraction: float) -> float:
        """Seconds left with `fraction` (0 to 1) of the job done."""
        rate = (fraction - self.f0) / max(time.time() - self.t0, 1e-9)
        return (1.0 - fraction) / rate if rate > 0 else math.inf

    def update(self, text: str, fraction: float | None = None, done: bool = False) -> None:
        """Shows `text` (with the ETA at `fraction` done, unless `done`); the last line of a job
        (`done`) is always shown and ends the line."""
        now = time.time()
        if self.every is None or (not done and now - self.last < self.every):
            return
        self.last = now
        if fraction is not None and not done:
            text += f", ETA {hms(self.eta(fraction))}"
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if done else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erases a redrawn line, so that another line can be printed in its place."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
