"""What the search measured of one edit point: its cheap trial scores and, for a finalist, its
confirmation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from abliterate.find.point import EditPoint


@dataclass(frozen=True)
class TrialScore:
    """What one point scored.

    Attributes:
        point: the edit.
        refusal_score: mean first-token refusal log-odds on the harmful trial prompts (lower is better).
        kl: mean first-token KL on the harmless trial prompts.
        refusals: not-helped replies (refused + dodged, by the judge) among ``verdicts`` (finalists only).
        n_confirm: harmful confirmation prompts judged (the first ``n_confirm`` of them).
        confirm_kl: first-token KL on the harmless confirmation prompts (finalists only).
        multi_kl: multi-token KL over the original's greedy replies to harmless prompts (finalists only).
        verdicts: per judged confirmation prompt, whether the reply left the user without help.
        dropped: why the confirmation stopped measuring this finalist, or ``None``.
    """

    point: EditPoint
    refusal_score: float
    kl: float
    refusals: int | None = None
    n_confirm: int = 0
    confirm_kl: float | None = None
    multi_kl: float | None = None
    verdicts: tuple[bool, ...] = ()
    dropped: str | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain dictionary for the Pareto JSON."""
        return {**asdict(self), "point": asdict(self.point), "verdicts": [int(v) for v in self.verdicts]}
