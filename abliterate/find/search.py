"""Search the family of exact edits (``abliterate.find.point``) for a point that beats the paper's on both
axes: no more replies that leave the user without help, and less damage.

The search (Optuna TPE, two objectives) scores trials cheaply: the mean first-token refusal score on
harmful validation prompts and the first-token KL on harmless ones, several trials batched per forward
pass when the prompts are few (one edit per batch row). Finalists under the paper point's KL, and the
paper's point itself, are then confirmed with long greedy replies read by the judge and with the
multi-token KL (``abliterate.find.confirm``): the paper's point is kept unless one dominates it. The
evaluation split is never seen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from abliterate.adapters.resolve import ResolvedWriter
from abliterate.adapters.spec import Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.find.confirm import Confirmer, ConfirmSettings, confirm_finalists
from abliterate.find.point import EditPoint
from abliterate.find.scores import kl_divergence, refusal_scores
from abliterate.find.space import SearchSpace, warm_starts
from abliterate.find.stats import PairedDifference
from abliterate.find.trial import TrialScore
from abliterate.model.batching import EncodedPrompts, copied_last_logits
from abliterate.model.hooks import ablated, subspace_projection

logger = logging.getLogger(__name__)

# The finalists' KL bounds, as multiples of the paper point's trial KL (``finalists``).
LADDER = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2)


@dataclass(frozen=True)
class SearchData:
    """The prompts and references a search scores against (all from the validation split).

    Attributes:
        harmful: a few harmful val prompts for the cheap trials.
        harmless: a few harmless val prompts for the cheap trials.
        harmless_reference: the unedited model's last-position logits on ``harmless``.
        refusal_ids: refusal first-token ids.
    """

    harmful: EncodedPrompts
    harmless: EncodedPrompts
    harmless_reference: torch.Tensor
    refusal_ids: list[int]


@torch.no_grad()
def batched_logits(
    model: nn.Module, adapter: Adapter, encoded: EncodedPrompts, edits: list[DeclaredEdit]
) -> torch.Tensor:
    """Last-position logits ``[n_edits, n_prompts, vocab]`` with each edit hooked on its own rows (of
    rank 1 or 2: each basis padded to 2 rows, ``padded_bases``)."""
    copies = len(edits)
    directions = padded_bases(edits)

    @contextmanager
    def hooks(rows: int, prefix: bool) -> Iterator[None]:
        per_copy = rows // copies
        per_row = directions.repeat_interleave(per_copy, dim=0)

        def scales(writer: ResolvedWriter) -> torch.Tensor:
            values = torch.tensor([_padded_scales(edit, writer) for edit in edits], dtype=torch.float32)
            return values.repeat_interleave(per_copy, dim=0)

        with ablated(model, adapter, subspace_projection(per_row, scales)):
            yield

    return copied_last_logits(model, encoded, hooks, copies)


def padded_bases(edits: list[DeclaredEdit]) -> torch.Tensor:
    """``[n_edits, 2, d_model]``: each edit's direction, with a zero second row for rank-1 edits."""
    bases = []
    for edit in edits:
        direction = edit.direction
        bases.append(
            direction if direction.dim() == 2 else torch.stack([direction, torch.zeros_like(direction)])
        )
    return torch.stack(bases)


def _padded_scales(edit: DeclaredEdit, writer: ResolvedWriter) -> tuple[float, float]:
    scales = edit.scales(writer.group, writer.layer)
    return (scales, 0.0) if isinstance(scales, float) else scales


def score_points(
    model: nn.Module, adapter: Adapter, space: SearchSpace, data: SearchData, points: list[EditPoint]
) -> list[TrialScore]:
    """Cheap scores of ``points``, all in the same forward passes."""
    edits = [space.declared(point) for point in points]
    harmful = batched_logits(model, adapter, data.harmful, edits)
    harmless = batched_logits(model, adapter, data.harmless, edits)
    scores = []
    for point, refusal_rows, harmless_rows in zip(points, harmful, harmless, strict=True):
        refusal = refusal_scores(refusal_rows, data.refusal_ids).mean().item()
        kl = kl_divergence(data.harmless_reference, harmless_rows).mean().item()
        scores.append(TrialScore(point, refusal, kl))
    return scores


@dataclass
class SearchResult:
    """Everything the search evaluated.

    Attributes:
        trials: every cheap trial, the paper's point first.
        confirmed: the finalists with their confirmations, the paper's point first.
        chosen: the paper's point, or the finalist that dominates it (``abliterate.find.confirm``).
        outcome: one line: the paper's point kept and why, or the point that dominates it.
        warning: one line when a user's ``--max-kl`` forces a point not helped more often than the
            paper's, else ``None``.
        difference: the paired not-helped difference chosen − paper on the confirmation prompts.
        seconds: per phase: ``trials``, ``confirm``.
    """

    trials: list[TrialScore]
    confirmed: list[TrialScore]
    chosen: TrialScore
    outcome: str = ""
    warning: str | None = None
    difference: PairedDifference | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self, max_kl: float | None) -> dict[str, object]:
        """The Pareto JSON: every trial, the front, the finalists, the choice and why."""
        front = pareto_front(self.trials)
        return {
            "max_kl": max_kl,
            "trials": [trial.to_dict() for trial in self.trials],
            "front": [self.trials.index(trial) for trial in front],
            "confirmed": [trial.to_dict() for trial in self.confirmed],
            "chosen": self.chosen.to_dict(),
            "paper": self.trials[0].to_dict(),
            "outcome": self.outcome,
            "warning": self.warning,
            "difference": None if self.difference is None else asdict(self.difference),
            "seconds": self.seconds,
        }


def pareto_front(trials: list[TrialScore]) -> list[TrialScore]:
    """Trials no other trial beats on both refusal score and KL, by increasing KL."""
    ordered = sorted(trials, key=lambda trial: (trial.kl, trial.refusal_score))
    front: list[TrialScore] = []
    for trial in ordered:
        if not front or trial.refusal_score < front[-1].refusal_score:
            front.append(trial)
    return front


def run_trials(
    model: nn.Module,
    adapter: Adapter,
    space: SearchSpace,
    data: SearchData,
    *,
    trials: int,
    budget_s: float,
    per_forward: int,
    seed: int = 0,
) -> list[TrialScore]:
    """Optuna TPE over the family, two objectives (refusal score, KL), ``per_forward`` trials at a time.

    The paper's point is the first trial evaluated, so the front always contains it or something
    better on both objectives.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(16, trials))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    anchor = space.anchor
    for params in warm_starts(space):
        study.enqueue_trial(params)
    started = time.perf_counter()
    results: list[TrialScore] = []
    while len(results) < trials and (not results or time.perf_counter() - started < budget_s):
        asked = [study.ask() for _ in range(min(per_forward, trials - len(results)))]
        points = [space.suggest(trial) for trial in asked]
        if not results:
            points[0] = anchor  # exactly the paper's point, whatever the sampler's float rounding
        for trial, score in zip(asked, score_points(model, adapter, space, data, points), strict=True):
            study.tell(trial, [score.refusal_score, score.kl])
            results.append(score)
    return results


def finalists(trials: list[TrialScore], max_kl: float | None, count: int) -> list[TrialScore]:
    """The paper's point and up to ``count`` trials on a ladder of KL bounds under the paper point's KL
    (and under ``max_kl``, a user's cap, when it is lower).

    Only a point below the paper's KL can dominate it, so the top rung is the paper point's trial KL.
    Rather than the ``count`` lowest refusal scores (which crowd at the top of the allowed KL and share
    its risk), finalist ``i`` is the lowest-refusal-score trial not yet picked whose trial KL is under
    ``LADDER[i] × bound``; unused rungs fall back to the next best trial under the top rung.
    """
    paper = trials[0]
    bound = paper.kl if max_kl is None else min(max_kl, paper.kl)
    picked: list[TrialScore] = []
    ranked = sorted(trials[1:], key=lambda trial: trial.refusal_score)
    for rung in LADDER[:count]:
        best = next((t for t in ranked if t.kl <= rung * bound and t not in picked), None)
        if best is not None:
            picked.append(best)
    for trial in ranked:
        if len(picked) >= count:
            break
        if trial.kl <= LADDER[0] * bound and trial not in picked:
            picked.append(trial)
    return [paper, *picked]


@dataclass(frozen=True)
class SearchSettings:
    """How much the search may spend and what it must meet.

    Attributes:
        trials: cheap trials at most.
        budget_s: seconds the cheap trials may take (the paper's point always runs).
        per_forward: trials batched into one forward pass.
        finalists: trials confirmed besides the paper's point.
        confirm: the confirmation's rule and budget (its ``max_kl``: the user's cap, ``None``: none).
        seed: the sampler's seed.
    """

    trials: int
    budget_s: float
    per_forward: int
    finalists: int
    confirm: ConfirmSettings = field(default_factory=ConfirmSettings)
    seed: int = 0


def search_edit(
    model: nn.Module,
    adapter: Adapter,
    space: SearchSpace,
    data: SearchData,
    confirmer: Confirmer,
    settings: SearchSettings,
) -> SearchResult:
    """Cheap trials, then the finalists (the paper's point always first) confirmed against the paper's
    point by ``confirmer``: the result is the paper's point or a finalist that dominates it.

    Raises:
        ValueError: a user's ``--max-kl`` that no finalist meets (see ``confirm_finalists``).
    """
    started = time.perf_counter()
    trials = run_trials(
        model,
        adapter,
        space,
        data,
        trials=settings.trials,
        budget_s=settings.budget_s,
        per_forward=settings.per_forward,
        seed=settings.seed,
    )
    searched = time.perf_counter()
    picked = finalists(trials, settings.confirm.max_kl, settings.finalists)
    decision = confirm_finalists(picked, space.declared, confirmer, settings.confirm)
    seconds = {"trials": searched - started, "confirm": time.perf_counter() - searched}
    logger.info("search: %s", decision.outcome)
    if decision.warning is not None:
        logger.warning("%s", decision.warning)
    return SearchResult(
        trials,
        decision.confirmed,
        decision.confirmed[decision.chosen],
        decision.outcome,
        decision.warning,
        decision.difference,
        {k: round(v, 3) for k, v in seconds.items()},
    )
