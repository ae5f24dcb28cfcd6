"""Search the family of exact edits (``abliterate.find.point``) for the fewest refusals under a KL bound.

The search (Optuna TPE, two objectives) scores trials cheaply: the mean first-token refusal score on a
few harmful validation prompts and the first-token KL on a few harmless ones, several trials batched per
forward pass (one edit per batch row). The best trials under the KL bound are confirmed by greedy
generation on the full validation split, counted by ``abliterate.find.judge``; the evaluation split is never
seen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from abliterate.adapters.resolve import ResolvedWriter
from abliterate.adapters.spec import Adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.find.point import EditPoint
from abliterate.find.scores import kl_divergence, refusal_scores
from abliterate.find.space import SearchSpace, warm_starts
from abliterate.model.batching import EncodedPrompts, copied_last_logits
from abliterate.model.hooks import ablated, subspace_projection

# The finalists' KL bounds, as multiples of --max-kl (``finalists``).
LADDER = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2)


@dataclass(frozen=True)
class TrialScore:
    """What one point scored.

    Attributes:
        point: the edit.
        refusal_score: mean first-token refusal log-odds on the harmful trial prompts (lower is better).
        kl: mean first-token KL on the harmless trial prompts.
        refusals: refusals among greedy replies to the harmful val prompts (confirmed points only).
        n_confirm: prompts those replies were generated for.
        confirm_kl: first-token KL on every harmless val prompt (confirmed points only).
    """

    point: EditPoint
    refusal_score: float
    kl: float
    refusals: int | None = None
    n_confirm: int = 0
    confirm_kl: float | None = None

    def to_dict(self) -> dict[str, object]:
        """Plain dictionary for the Pareto JSON."""
        return {**asdict(self), "point": asdict(self.point)}


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
        confirmed: the finalists with their generation counts, best first.
        chosen: the confirmed point with the fewest refusals under the KL bound.
        seconds: per phase: ``trials``, ``confirm``.
    """

    trials: list[TrialScore]
    confirmed: list[TrialScore]
    chosen: TrialScore
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self, max_kl: float) -> dict[str, object]:
        """The Pareto JSON: every trial, the front, the finalists and the choice."""
        front = pareto_front(self.trials)
        return {
            "max_kl": max_kl,
            "trials": [trial.to_dict() for trial in self.trials],
            "front": [self.trials.index(trial) for trial in front],
            "confirmed": [trial.to_dict() for trial in self.confirmed],
            "chosen": self.chosen.to_dict(),
            "paper": self.trials[0].to_dict(),
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


# Confirms a finalist's edit: refusals by the judge, prompts judged, KL on every harmless val prompt.
Confirm = Callable[[DeclaredEdit], tuple[int, int, float]]


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


def finalists(trials: list[TrialScore], max_kl: float, count: int) -> list[TrialScore]:
    """The paper's point and up to ``count`` trials on a ladder of KL bounds at and below ``max_kl``.

    Rather than the ``count`` lowest refusal scores (which crowd at the top of the allowed KL and share
    its risk), finalist ``i`` is the lowest-refusal-score trial not yet picked whose trial KL is under
    ``LADDER[i] × max_kl``; unused rungs fall back to the next best trial under the top rung. The
    confirmation then counts refusals by generation, where the cheap refusal score can mislead.
    """
    picked: list[TrialScore] = []
    ranked = sorted(trials[1:], key=lambda trial: trial.refusal_score)
    for rung in LADDER[:count]:
        best = next((t for t in ranked if t.kl <= rung * max_kl and t not in picked), None)
        if best is not None:
            picked.append(best)
    for trial in ranked:
        if len(picked) >= count:
            break
        if trial.kl <= LADDER[0] * max_kl and trial not in picked:
            picked.append(trial)
    return [trials[0], *picked]


def choose(confirmed: list[TrialScore], max_kl: float) -> TrialScore:
    """The fewest confirmed refusals with KL ≤ ``max_kl``; on ties, the lower first-token refusal score
    (the stronger edit), then the lower KL.

    Thirty-odd validation prompts saturate: on the demo four finalists tied at 1/32, and preferring the
    lowest KL among them picked the weakest edit (12 % refusals on the evaluation split against the
    paper point's 6 %). The refusal score is the continuous measure of the same thing that breaks the tie.

    Raises:
        ValueError: no confirmed point meets the bound (one line: the lowest KL reached, the flag).
    """
    passing = [trial for trial in confirmed if trial.confirm_kl is not None and trial.confirm_kl <= max_kl]
    if not passing:
        lowest = min(trial.confirm_kl for trial in confirmed if trial.confirm_kl is not None)
        raise ValueError(
            f"no searched edit reaches first-token KL ≤ {max_kl:g} (lowest: {lowest:.4f}); "
            f"raise --max-kl (e.g. --max-kl {math.ceil(lowest * 100) / 100:g}) or use --search none"
        )
    return min(passing, key=lambda trial: (trial.refusals, trial.refusal_score, trial.confirm_kl))


def confirm_points(points: list[TrialScore], confirm: Confirm, space: SearchSpace) -> list[TrialScore]:
    """Run ``confirm`` (greedy generation + judge, full-val KL) on each finalist."""
    confirmed = []
    for trial in points:
        refusals, n, kl = confirm(space.declared(trial.point))
        confirmed.append(replace(trial, refusals=refusals, n_confirm=n, confirm_kl=kl))
    return confirmed


@dataclass(frozen=True)
class SearchSettings:
    """How much the search may spend and what it must meet.

    Attributes:
        trials: cheap trials at most.
        budget_s: seconds the cheap trials may take (the paper's point always runs).
        per_forward: trials batched into one forward pass.
        finalists: trials confirmed by generation besides the paper's point.
        max_kl: the KL bound of the choice.
        seed: the sampler's seed.
    """

    trials: int
    budget_s: float
    per_forward: int
    finalists: int
    max_kl: float
    seed: int = 0


def search_edit(
    model: nn.Module,
    adapter: Adapter,
    space: SearchSpace,
    data: SearchData,
    confirm: Confirm,
    settings: SearchSettings,
) -> SearchResult:
    """Cheap trials, then the finalists confirmed by ``confirm``, then the choice under the KL bound.

    Raises:
        ValueError: no finalist meets ``settings.max_kl`` (see ``choose``).
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
    confirmed = confirm_points(finalists(trials, settings.max_kl, settings.finalists), confirm, space)
    seconds = {"trials": searched - started, "confirm": time.perf_counter() - searched}
    chosen = choose(confirmed, settings.max_kl)
    return SearchResult(trials, confirmed, chosen, {k: round(v, 3) for k, v in seconds.items()})
