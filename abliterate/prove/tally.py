"""The weight certificate's verdict (``Certificate``) and the counts it is built from while both checkpoints
are read (``Tally``)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from abliterate.prove.bounds import LEAK_RATIO_LIMIT
from abliterate.prove.verdict import MAX_LISTED_FAILURES, Verdict


@dataclass(frozen=True)
class Certificate(Verdict):
    """The verdict of ``certify_checkpoint``.

    Attributes:
        passed: every tensor holds what the declared edit says.
        n_tensors: tensors in the edited checkpoint.
        n_edited: tensors the structure requires to be edited (all found and checked).
        n_exact: edited tensors bitwise equal to this machine's fold.
        n_bounded: edited tensors within the stated bound but not bitwise equal.
        n_unchanged: tensors verified bitwise equal to the original.
        max_leak_ratio: the largest leak ratio of a bounded tensor (1.0 when all are exact).
        leak_ratio_limit: the limit it was judged against.
        groups: per writer group, how many tensors were certified and over how many layers.
        failures: the first failures, one line each.
        n_failures: how many tensors failed.
        bytes_read: bytes read from both checkpoints.
        seconds: wall-clock time.
    """

    passed: bool
    n_tensors: int
    n_edited: int
    n_exact: int
    n_bounded: int
    n_unchanged: int
    max_leak_ratio: float
    leak_ratio_limit: float
    groups: dict[str, dict[str, int]]
    failures: list[str]
    n_failures: int
    bytes_read: int
    seconds: float

    failing = "tensor(s) fail the certificate"

    @property
    def reason(self) -> str:
        """The first failure, or an empty string when passed."""
        if not self.passed and self.n_tensors == 0:  # refused before any tensor was read: the declared edit
            return self.failures[0]  # itself, said in its own words
        return super().reason


class Tally:
    """The counts and failure lines gathered while the checkpoint is read, then made a ``Certificate``."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.n_tensors = self.n_edited = self.n_exact = self.n_bounded = self.n_unchanged = 0
        self.max_leak = 1.0
        self.bytes_read = 0
        self.groups: dict[str, dict[str, set[int] | int]] = defaultdict(
            lambda: {"tensors": 0, "layers": set()}
        )

    def fail(self, line: str) -> None:
        self.failures.append(line)

    def unchanged(self, same: bool, failure: str) -> None:
        """A tensor that must equal the original: counted when it does (``same``), else ``failure``."""
        if same:
            self.n_unchanged += 1
        else:
            self.fail(failure)

    def edited(self, group: str, layer: int, exact: bool, leak: float) -> None:
        self.n_edited += 1
        self.n_exact += exact
        self.n_bounded += not exact
        if not leak <= self.max_leak:  # a NaN leak is kept too (``max`` would drop it)
            self.max_leak = leak
        self.groups[group]["tensors"] += 1
        self.groups[group]["layers"].add(layer)

    def certificate(self, seconds: float) -> Certificate:
        groups = {
            name: {"tensors": int(values["tensors"]), "layers": len(values["layers"])}
            for name, values in sorted(self.groups.items())
        }
        return Certificate(
            passed=not self.failures,
            n_tensors=self.n_tensors,
            n_edited=self.n_edited,
            n_exact=self.n_exact,
            n_bounded=self.n_bounded,
            n_unchanged=self.n_unchanged,
            max_leak_ratio=self.max_leak,
            leak_ratio_limit=LEAK_RATIO_LIMIT,
            groups=groups,
            failures=self.failures[:MAX_LISTED_FAILURES],
            n_failures=len(self.failures),
            bytes_read=self.bytes_read,
            seconds=round(seconds, 3),
        )
