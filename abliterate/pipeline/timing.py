"""Wall-clock seconds and resident memory per stage of a run (the manifest's ``timings`` and ``memory``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from abliterate.io.memory import MIB, RSSFigures, RSSWindow, peak_rss

P = ParamSpec("P")
T = TypeVar("T")


class StageTimer:
    """Wall-clock seconds and resident memory per named stage, for the manifest's ``timings`` and ``memory``.

    A name that recurs adds up: ``evaluate`` covers the evaluation before and after the edit,
    ``verify`` the reference logits before the fold and the comparison after it; its memory figures are
    the highest peak and growth of its occurrences and the resident size at the end of the last.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.rss: dict[str, dict[str, float]] = {}
        self.window: RSSWindow | None = None

    def __call__(self, name: str, stage: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``stage(*args, **kwargs)`` and add its duration and memory figures to ``name``."""
        begin = time.perf_counter()
        outer, self.window = self.window, RSSWindow()
        try:
            with self.window:
                return stage(*args, **kwargs)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin
            self._add_memory(name, self.window.figures)
            self.window = outer

    def observe(self) -> None:
        """Count the resident size now in the running stage's peak (a stage's short-lived copy)."""
        if self.window is not None:
            self.window.observe()

    def _add_memory(self, name: str, figures: RSSFigures | None) -> None:
        if figures is None:
            return
        earlier = self.rss.get(name, {"peak_rss_mib": 0.0, "growth_mib": 0.0})
        self.rss[name] = {
            "peak_rss_mib": round(max(earlier["peak_rss_mib"], figures.peak / MIB), 1),
            "growth_mib": round(max(earlier["growth_mib"], figures.growth / MIB), 1),
            "end_rss_mib": round(figures.end / MIB, 1),
        }

    def timings(self) -> dict[str, float]:
        """``{"<stage>_s": seconds, …, "total_s": seconds since the timer started}``, to the millisecond."""
        stages = {f"{name}_s": round(seconds, 3) for name, seconds in self.seconds.items()}
        return {**stages, "total_s": round(time.perf_counter() - self.started, 3)}

    def memory(self) -> dict[str, Any]:
        """The manifest's ``memory``: per stage, the peak resident size during it, its growth above the
        resident size when it began, and the resident size when it ended (MiB); and the process's peak."""
        return {"peak_rss_mib": round(peak_rss() / MIB, 1), "stages": dict(self.rss)}
