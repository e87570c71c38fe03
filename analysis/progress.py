"""Progress of long work in stages: how far it is and about how long is left.

On a terminal, one line rewritten in place (a bar, the stage, elapsed and left); anywhere else (a log
file, a pipe), one whole line per finished stage, so a log reads top to bottom. The time left is the
elapsed time scaled by the work still to do, counted in units the caller gives each stage.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def duration(seconds: float) -> str:
    """3.2s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """`total` units of work under a label; `done(units, stage)` after each stage, `update(units, text)`
    for work inside a stage (shown on a terminal only), `close()` at the end."""

    def __init__(self, label: str, total: float, stream: TextIO | None = None):
        self.label, self.total, self.stream = label, max(float(total), 1e-12), stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.finished = 0.0
        self.stage = "starting"
        self._last = 0.0

    def _line(self, stage: str) -> str:
        elapsed = time.perf_counter() - self.start
        fraction = min(self.finished / self.total, 1.0)
        left = f", about {duration(elapsed * (1 - fraction) / fraction)} left" if 0 < fraction < 1 else ""
        return f"{self.label}: {100 * fraction:3.0f}% {stage}, {duration(elapsed)} elapsed{left}"

    def _show(self, text: str) -> None:
        width = 30
        filled = int(width * min(self.finished / self.total, 1.0))
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K", end="", file=self.stream, flush=True)

    def done(self, units: float, stage: str) -> None:
        """A stage finished: on a terminal the line is rewritten, elsewhere a line is printed."""
        self.finished += units
        self.stage = stage
        if self.live:
            self._show(self._line(stage))
        else:
            print(self._line(stage), file=self.stream, flush=True)

    def update(self, units: float, text: str) -> None:
        """Work inside a stage: shown on a terminal (at most every half second), not in a log."""
        self.finished += units
        now = time.perf_counter()
        if self.live and now - self._last > 0.5:
            self._last = now
            self._show(f"{self._line(self.stage)} | {text}")

    def close(self) -> None:
        if self.live:
            print(file=self.stream, flush=True)
