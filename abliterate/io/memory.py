"""Resident memory of this process: now, its lifetime peak, and the peak within a stretch of work.

``ru_maxrss`` only ever grows, so it cannot say which stage of a run needed the memory; ``RSSWindow``
samples the current resident size from a light background thread while a stage runs and combines it
with ``ru_maxrss`` (exact whenever the stage set a new lifetime peak).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

MIB = 1024 * 1024
_STATM = Path("/proc/self/statm")
# Every 20 ms: one small file read, negligible next to any stage, and short enough to catch a temporary
# copy of a tensor of a few hundred MiB while it exists.
SAMPLE_INTERVAL_S = 0.02


def current_rss() -> int | None:
    """Bytes resident now (``/proc/self/statm``; ``psutil`` elsewhere when installed), or ``None``."""
    if _STATM.is_file():
        pages = int(_STATM.read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """Bytes of this process's lifetime peak resident size (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


@dataclass(frozen=True)
class RSSFigures:
    """Resident memory over one window of work.

    Attributes:
        start: bytes resident when it began.
        end: bytes resident when it ended.
        peak: the highest resident size seen during it (sampled, or the lifetime peak when the window
            raised it).
    """

    start: int
    end: int
    peak: int

    @property
    def growth(self) -> int:
        """Bytes the window needed above what was resident when it began (``peak - start``)."""
        return self.peak - self.start


class RSSWindow:
    """Context manager measuring resident memory while its body runs (``figures`` once it exits).

    A daemon thread samples the current resident size every ``interval`` seconds; ``observe`` takes one
    sample in the caller's thread (for a temporary copy too short-lived for the sampler to see).
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL_S) -> None:
        self.interval = interval
        self.figures: RSSFigures | None = None
        self._highest = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._lifetime_at_start = 0

    def observe(self) -> None:
        """Take one sample of the current resident size now."""
        now = current_rss()
        if now is not None and now > self._highest:
            self._highest = now  # one writer at a time matters little: a lost sample is a lower peak

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.observe()

    def __enter__(self) -> RSSWindow:
        self._lifetime_at_start = peak_rss()
        self._start = current_rss() or 0
        self._highest = self._start
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.observe()
        end = current_rss() or 0
        peak = self._highest
        lifetime = peak_rss()
        if lifetime > self._lifetime_at_start:  # the lifetime peak was set during this window: exact
            peak = max(peak, lifetime)
        self.figures = RSSFigures(start=self._start, end=end, peak=max(peak, end))
