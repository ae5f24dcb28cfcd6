"""What every proof's verdict shares: pass or fail, the first failures as lines, and one reason to report."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

# A verdict lists its first failures only (``n_failures`` counts them all), so a report stays readable.
MAX_LISTED_FAILURES = 20


class Verdict:
    """Base of a proof's frozen dataclass verdict (``passed``, ``failures``, ``n_failures``).

    A subclass names what its failures count (``failing``, e.g. ``"tensor(s) fail the certificate"``); the
    reason reported for a failed verdict is that count and the first failure.
    """

    passed: bool
    failures: list[str]
    n_failures: int
    failing: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary for JSON output."""
        return asdict(self)  # type: ignore[call-overload]

    @property
    def reason(self) -> str:
        """The first failure, or an empty string when passed."""
        if self.passed:
            return ""
        return f"{self.n_failures} {self.failing}: {self.failures[0]}"
