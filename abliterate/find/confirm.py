"""Confirm the search's finalists against the paper's point, and keep the paper's point unless one
dominates it.

A searched point *dominates* the paper's point (its candidate at strength 1) when, on the same
confirmation prompts, its not-helped rate (refused + dodged, by the long-reply judge) is no higher with
confidence — the upper end of the 95 % paired-bootstrap interval of the difference searched − paper is at
most ``ConfirmSettings.max_increase`` (+2 points) — and its first-token KL and multi-token KL on harmless
prompts are both lower. Anything less keeps the paper's point.

Generation is the cost, so it is spent in stages (``confirm_finalists``):

1. damage first (no generation): each finalist's first-token and multi-token KL; with no KL cap (or a
   cap the paper's point meets) a finalist that is not lower on both cannot dominate and is dropped;
2. the first ``stage_prompts`` confirmation prompts for the paper's point and every finalist left; a
   finalist not helped on ``drop_margin`` or more prompts than the paper's point there is dropped: to pass
   the paired test on all prompts it would have to help where the paper's point fails on more of the
   remaining prompts than the other way round, after doing worse on the first block;
3. the rest of the confirmation prompts for the paper's point and at most ``survivors`` finalists, then
   the paired test on all of them.

With a user's ``--max-kl`` that the paper's point exceeds, the point under the cap with the fewest
not-helped replies is chosen (stage 2 drops against the best of them instead), and a warning says when
it is not helped more often than the paper's point on the same prompts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from abliterate.edit.declared import DeclaredEdit
from abliterate.find.point import EditPoint
from abliterate.find.stats import PairedDifference, paired_bootstrap
from abliterate.find.trial import TrialScore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Confirmer:
    """How a finalist's edit is measured, the edit hooked on the original model.

    Attributes:
        damage: ``edit → (first-token KL, multi-token KL)`` on harmless confirmation prompts.
        verdicts: ``(edit, start, stop) → not helped?`` per harmful confirmation prompt ``start:stop``
            (greedy long replies read by the judge).
        n_prompts: harmful confirmation prompts.
    """

    damage: Callable[[DeclaredEdit], tuple[float, float]]
    verdicts: Callable[[DeclaredEdit, int, int], list[bool]]
    n_prompts: int


@dataclass(frozen=True)
class ConfirmSettings:
    """The confirmation's rule and budget.

    Attributes:
        max_kl: the user's first-token KL cap, or ``None``: no cap.
        stage_prompts: confirmation prompts of the first stage (elimination).
        survivors: finalists confirmed on every prompt at most.
        drop_margin: a finalist not helped on this many more first-stage prompts than the reference
            (the paper's point) is dropped.
        max_increase: the paired test's bound on the upper end of the not-helped difference.
        seed: the bootstrap's seed.
    """

    max_kl: float | None = None
    stage_prompts: int = 32
    survivors: int = 2
    drop_margin: int = 1
    max_increase: float = 0.02
    seed: int = 0


@dataclass(frozen=True)
class Decision:
    """What the confirmation chose and why.

    Attributes:
        chosen: index into the finalists (0: the paper's point).
        confirmed: the finalists with their measurements, the paper's point first.
        outcome: one line: the paper's point kept (and why), or the point that dominates it.
        warning: one line when a user's cap forces a point not helped more often than the paper's.
        difference: the paired not-helped difference chosen − paper, when both were judged on the
            same prompts and differ.
    """

    chosen: int
    confirmed: list[TrialScore]
    outcome: str
    warning: str | None = None
    difference: PairedDifference | None = None


def confirm_finalists(
    finalists: list[TrialScore],
    declared: Callable[[EditPoint], DeclaredEdit],
    confirmer: Confirmer,
    settings: ConfirmSettings,
) -> Decision:
    """Measure the finalists in stages (module docstring) and decide.

    Args:
        finalists: ``TrialScore``s, the paper's point first.
        declared: the edit of a point.
        confirmer: the measurements.
        settings: the rule and budget.

    Raises:
        ValueError: a user's cap that no finalist meets (one line: the lowest KL, the flag).
    """
    edits = [declared(trial.point) for trial in finalists]
    measured = []
    for trial, edit in zip(finalists, edits, strict=True):
        kl, multi = confirmer.damage(edit)
        measured.append(replace(trial, confirm_kl=kl, multi_kl=multi))
    paper, cap = measured[0], settings.max_kl
    paper_eligible = cap is None or paper.confirm_kl <= cap
    alive = {}
    for index, trial in enumerate(measured[1:], start=1):
        reason = _damage_reason(trial, paper, cap, paper_eligible)
        if reason is None:
            alive[index] = trial
        else:
            measured[index] = replace(trial, dropped=reason)
    if not paper_eligible and not alive:
        lowest = min(trial.confirm_kl for trial in measured)
        raise ValueError(
            f"no searched edit reaches first-token KL ≤ {cap:g} (lowest: {lowest:.4f}); "
            f"raise --max-kl (e.g. --max-kl {math.ceil(lowest * 100) / 100:g}) or use --search none"
        )
    if alive:
        _judge_in_stages(measured, edits, alive, confirmer, settings, paper_eligible)
    return _decide(measured, settings, paper_eligible)


def _damage_reason(
    trial: TrialScore, paper: TrialScore, cap: float | None, paper_eligible: bool
) -> str | None:
    """Why a finalist is out before any generation, or ``None``."""
    if cap is not None and trial.confirm_kl > cap:
        return f"first-token KL {trial.confirm_kl:.4f} over --max-kl {cap:g}"
    if paper_eligible and not (trial.confirm_kl < paper.confirm_kl and trial.multi_kl < paper.multi_kl):
        return (
            f"KL not below the paper point's (first-token {trial.confirm_kl:.4f} vs {paper.confirm_kl:.4f}, "
            f"multi-token {trial.multi_kl:.4f} vs {paper.multi_kl:.4f})"
        )
    return None


def _judge_in_stages(
    measured: list[TrialScore],
    edits: list[DeclaredEdit],
    alive: dict[int, TrialScore],
    confirmer: Confirmer,
    settings: ConfirmSettings,
    paper_eligible: bool,
) -> None:
    """Stages 2 and 3: judged replies, first block for all, the rest for the paper's point and the
    survivors; ``measured`` gets each finalist's verdicts (and why it was dropped)."""
    first = min(settings.stage_prompts, confirmer.n_prompts)
    for index in [0, *alive]:
        verdicts = tuple(confirmer.verdicts(edits[index], 0, first))
        measured[index] = replace(measured[index], verdicts=verdicts, refusals=sum(verdicts), n_confirm=first)
    counts = {index: measured[index].refusals for index in alive}
    reference = measured[0].refusals if paper_eligible else min(counts.values())
    ranked = sorted(alive, key=lambda index: (counts[index], measured[index].refusal_score))
    survivors = []
    for index in ranked:
        excess = counts[index] - reference
        if excess >= settings.drop_margin:
            why = f"not helped on {counts[index]}/{first} first-stage prompts vs the reference's {reference}"
            measured[index] = replace(measured[index], dropped=why)
        elif len(survivors) >= settings.survivors:
            measured[index] = replace(measured[index], dropped=f"beyond the {settings.survivors} survivors")
        else:
            survivors.append(index)
    if not survivors or first >= confirmer.n_prompts:
        return
    for index in [0, *survivors]:
        rest = tuple(confirmer.verdicts(edits[index], first, confirmer.n_prompts))
        verdicts = measured[index].verdicts + rest
        measured[index] = replace(
            measured[index], verdicts=verdicts, refusals=sum(verdicts), n_confirm=len(verdicts)
        )


def _decide(measured: list[TrialScore], settings: ConfirmSettings, paper_eligible: bool) -> Decision:
    """The choice among the fully judged finalists (module docstring), with its outcome line."""
    paper = measured[0]
    judged = [
        index
        for index, trial in enumerate(measured)
        if index and trial.dropped is None and trial.n_confirm and trial.n_confirm == paper.n_confirm
    ]
    tests = {index: _paired(measured[index], paper, settings) for index in judged}
    if paper_eligible:
        winners = [index for index in judged if tests[index].high <= settings.max_increase]
        if winners:
            best = min(winners, key=lambda index: (tests[index].mean, measured[index].confirm_kl))
            versus = _versus(measured[best], paper, tests[best])
            outcome = f"searched point dominates the paper's point: {versus}"
            return Decision(best, measured, outcome, None, tests[best])
        return Decision(0, measured, f"paper point kept: {_why_kept(measured, tests)}")
    best = min(judged, key=lambda index: (measured[index].refusals, measured[index].refusal_score))
    chosen, test = measured[best], tests[best]
    outcome = (
        f"--max-kl {settings.max_kl:g} excludes the paper's point (first-token KL {paper.confirm_kl:.4f}): "
        f"{_versus(chosen, paper, test)}"
    )
    warning = None
    if chosen.refusals > paper.refusals:
        warning = (
            f"--max-kl {settings.max_kl:g} forces a point not helped on {chosen.refusals}/{chosen.n_confirm} "
            f"confirmation prompts against the paper point's {paper.refusals}/{paper.n_confirm} "
            f"(difference {_points(test)})"
        )
    return Decision(best, measured, outcome, warning, test)


def _paired(trial: TrialScore, paper: TrialScore, settings: ConfirmSettings) -> PairedDifference:
    return paired_bootstrap(
        [float(v) for v in trial.verdicts], [float(v) for v in paper.verdicts], seed=settings.seed
    )


def _points(test: PairedDifference) -> str:
    """``+1.6 pts [−0.8, +3.9] on 128 prompts``."""
    return f"{100 * test.mean:+.1f} pts [{100 * test.low:+.1f}, {100 * test.high:+.1f}] on {test.n} prompts"


def _versus(trial: TrialScore, paper: TrialScore, test: PairedDifference) -> str:
    """The comparison of a judged finalist with the paper's point, in one clause."""
    return (
        f"not-helped Δ = {_points(test)} ({trial.refusals} vs {paper.refusals}), first-token KL "
        f"{trial.confirm_kl:.4f} vs {paper.confirm_kl:.4f}, multi-token KL {trial.multi_kl:.4f} vs "
        f"{paper.multi_kl:.4f}"
    )


def _why_kept(measured: list[TrialScore], tests: dict[int, PairedDifference]) -> str:
    """Why no finalist dominated the paper's point, naming the closest one."""
    paper = measured[0]
    if tests:
        best = min(tests, key=lambda index: tests[index].high)
        return f"no searched point dominated it (best: {_versus(measured[best], paper, tests[best])})"
    others = measured[1:]
    if not others:
        return "no searched point was a finalist"
    judged = [trial for trial in others if trial.n_confirm]
    if judged:
        best = min(judged, key=lambda trial: trial.refusals)
        paper_count = paper.verdicts[: best.n_confirm].count(True)
        return (
            f"no searched point dominated it (best: not helped on {best.refusals}/{best.n_confirm} "
            f"first-stage prompts vs the paper point's {paper_count}, dropped)"
        )
    best = min(others, key=lambda trial: trial.confirm_kl)
    return f"no searched point dominated it (best: {best.dropped})"
