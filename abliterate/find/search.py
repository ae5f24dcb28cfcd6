"""Search a family of exact edits for the fewest refusals under a KL bound (issue 9).

Every point of the family is a weight edit ``W ← (I − s r̂ r̂ᵀ) W`` per residual writer, with

* a direction ``r̂``: the candidate at a (fractional) layer — a blend of the two neighbouring layers'
  candidates — and EOI position, optionally made orthogonal to the harmless mean at that layer;
* optionally a second direction ``q₂`` of weight ``w₂``: the candidate of another EOI position at the same
  (fractional) layer, made orthogonal to ``r̂``, so a writer of strength ``s`` gets the rank-2 edit
  ``W ← (I − s r̂ r̂ᵀ − s w₂ q₂ q₂ᵀ) W`` (the fold, the hooks and the certificate take any orthonormal
  subspace of up to ``abliterate.edit.fold.MAX_RANK`` rows);
* a strength ``s`` per writer: a peak strength per group (embedding, attention writers, MLP writers
  incl. experts), shaped over the layers by a triangular kernel ``max(0, 1 − |layer − peak| / width)``
  (``width = 0`` means flat: the same strength in every block).

The paper's point (its candidate, strength 1 everywhere) is ``EditPoint.paper``. Each point has an exact
hook equivalent (``abliterate.model.hooks.projection`` with strengths), so the parity gate and the
certificate (``DeclaredEdit.layer_strengths``) prove the folded result like the paper's edit.

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

from abliterate.adapters import Adapter, ResolvedWriter
from abliterate.edit.fold import Strength
from abliterate.find.select import refusal_scores
from abliterate.model.batching import EncodedPrompts, copied_last_logits
from abliterate.model.hooks import ablated, subspace_projection
from abliterate.prove.parity import kl_divergence

# Writer groups that take the MLP strength.
MLP_GROUPS = ("mlp", "experts", "shared_experts")
MAX_STRENGTH = 1.5
# A second direction weighted less than this is dropped (the point stays rank 1).
MIN_SECOND_WEIGHT = 0.05
# The finalists' KL bounds, as multiples of --max-kl (``finalists``).
LADDER = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2)


@dataclass(frozen=True)
class EditPoint:
    """One member of the edit family.

    Attributes:
        layer: layer of the direction; a fraction blends the candidates of the two layers around it.
        position: EOI position of the candidate (negative, from the end).
        orthogonal: remove the direction's component along the harmless mean at ``round(layer)``.
        embedding: strength at the embedding.
        attention: peak strength of the attention writers.
        mlp: peak strength of the MLP writers (and experts).
        peak: block where the profile peaks.
        width: blocks from the peak to where the strength reaches 0; 0 = flat profile.
        second: EOI position of a second direction (same layer), made orthogonal to the first.
        second_weight: its weight ``w₂`` relative to the first; 0 (or ``second`` unset) = rank 1.
        norm_preserving: fold ``(I − Q diag(s) Qᵀ) W D`` (``abliterate.edit.fold.norm_factors``), which keeps
            the length of every vector a writer emits per input coordinate; set by ``run
            --norm-preserving``, not searched (no gain on the demo, BENCHMARKS).
    """

    layer: float
    position: int
    orthogonal: bool = False
    embedding: float = 1.0
    attention: float = 1.0
    mlp: float = 1.0
    peak: float = 0.0
    width: float = 0.0
    second: int | None = None
    second_weight: float = 0.0
    norm_preserving: bool = False

    @classmethod
    def paper(
        cls, layer: int, position: int, orthogonal: bool = False, norm_preserving: bool = False
    ) -> EditPoint:
        """The paper's edit: the candidate at ``(layer, position)``, strength 1 on every writer
        (``norm_preserving``: the run's ``--norm-preserving`` variant of it)."""
        return cls(float(layer), position, orthogonal, norm_preserving=norm_preserving)

    def strength(self, group: str, layer: int) -> float:
        """The strength at a writer of ``group`` in block ``layer`` (``-1``: the embedding)."""
        if group == "embedding" or layer < 0:
            return self.embedding
        peak_strength = self.mlp if group in MLP_GROUPS else self.attention
        if self.width <= 0:
            return peak_strength
        return peak_strength * max(0.0, 1.0 - abs(layer - self.peak) / self.width)

    @property
    def rank(self) -> int:
        """1, or 2 with a second direction of non-zero weight."""
        return 2 if self.second is not None and self.second_weight != 0 else 1

    def weights(self) -> tuple[float, ...]:
        """Each direction's weight (``DeclaredEdit.weights``): empty for rank 1."""
        return () if self.rank == 1 else (1.0, self.second_weight)

    def strength_of(self, writer: ResolvedWriter) -> float | tuple[float, ...]:
        """What the fold and the hooks are given for a resolved writer: ``strength``, or for rank 2 that
        strength times each direction's weight."""
        strength = self.strength(writer.group, writer.layer)
        return strength if self.rank == 1 else (strength, strength * self.second_weight)

    def layer_strengths(self, n_layers: int) -> dict[str, tuple[float, ...]]:
        """Per group, one strength per block (``DeclaredEdit.layer_strengths``, the direction file)."""
        groups = ("attention", *MLP_GROUPS)
        return {group: tuple(self.strength(group, layer) for layer in range(n_layers)) for group in groups}

    def is_paper(self) -> bool:
        """Whether this is a plain candidate at strength 1 everywhere (not norm-preserving)."""
        flat = self.width <= 0 and self.embedding == self.attention == self.mlp == 1.0
        return flat and float(self.layer).is_integer() and self.rank == 1 and not self.norm_preserving


def point_direction(point: EditPoint, candidates: torch.Tensor, harmless_means: torch.Tensor) -> torch.Tensor:
    """The unit direction ``[d_model]`` (float32) of ``point``, or ``[2, d_model]`` orthonormal rows for a
    rank-2 point (its first row the rank-1 direction).

    Args:
        point: the edit.
        candidates: ``[n_positions, n_layers, d_model]`` raw candidates (harmful − harmless means).
        harmless_means: ``[n_positions, n_layers, d_model]`` harmless mean block inputs.
    """
    first = _blended(point, point.position, candidates, harmless_means)
    if point.rank == 1:
        return first.float()
    second = _blended(point, point.second, candidates, harmless_means)
    second = second - (second @ first) * first
    basis = torch.stack([first, second / second.norm()])
    # One more Gram-Schmidt pass in float64 keeps the float32 rows orthonormal to rounding.
    basis[1] -= (basis[1] @ basis[0]) * basis[0]
    return (basis / basis.norm(dim=-1, keepdim=True)).float()


def _blended(
    point: EditPoint, position: int, candidates: torch.Tensor, harmless_means: torch.Tensor
) -> torch.Tensor:
    """The unit float64 candidate at ``point.layer`` (blended) and ``position``, optionally ⊥ the
    harmless mean."""
    n_positions, n_layers, _ = candidates.shape
    index = position % n_positions
    low = min(math.floor(point.layer), n_layers - 1)
    high = min(low + 1, n_layers - 1)
    fraction = point.layer - low
    # Blend the unit candidates so neither layer dominates by its norm alone.
    units = candidates[index, [low, high]].double()
    units = units / units.norm(dim=-1, keepdim=True)
    vector = (1 - fraction) * units[0] + fraction * units[1]
    if point.orthogonal:
        mean = harmless_means[index, min(round(point.layer), n_layers - 1)].double()
        mean = mean / mean.norm()
        vector = vector - (vector @ mean) * mean
    return vector / vector.norm()


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
class SearchSpace:
    """What the search may vary, and the data it needs.

    Attributes:
        candidates: ``[n_positions, n_layers, d_model]`` raw candidates.
        harmless_means: the harmless mean block inputs, same shape.
        n_layers: depth of the model (the profile spans every block).
        anchor: the paper's point; the direction's layer varies within ``layer_radius`` of it.
        layer_radius: how far (in layers) the direction may move from the anchor.
        subspace: whether points may add a second direction (rank 2).
        norm_preserving: every suggested point is norm-preserving (``run --norm-preserving``); the cheap
            trials still score the plain edit's hooks, the confirmation the exact norm-preserving ones.
    """

    candidates: torch.Tensor
    harmless_means: torch.Tensor
    n_layers: int
    anchor: EditPoint
    layer_radius: float = 2.0
    subspace: bool = True
    norm_preserving: bool = False

    def suggest(self, trial: object) -> EditPoint:
        """An Optuna trial's point."""
        n_positions, n_extracted, _ = self.candidates.shape
        low = max(0.0, self.anchor.layer - self.layer_radius)
        high = min(float(n_extracted - 1), self.anchor.layer + self.layer_radius)
        position = trial.suggest_int("position", -n_positions, -1)
        return EditPoint(
            layer=trial.suggest_float("layer", low, high),
            position=position,
            orthogonal=trial.suggest_categorical("orthogonal", [False, True]),
            embedding=trial.suggest_float("embedding", 0.0, MAX_STRENGTH),
            attention=trial.suggest_float("attention", 0.0, MAX_STRENGTH),
            mlp=trial.suggest_float("mlp", 0.0, MAX_STRENGTH),
            peak=trial.suggest_float("peak", 0.0, float(self.n_layers - 1)),
            width=trial.suggest_float("width", 0.0, float(self.n_layers)),
            **self._second(trial, position, n_positions),
            norm_preserving=self.norm_preserving,
        )

    def _second(self, trial: object, position: int, n_positions: int) -> dict[str, object]:
        """The second direction: another EOI position (an offset from the first), and its weight; a
        weight under ``MIN_SECOND_WEIGHT`` (or a single EOI position) keeps the point rank 1."""
        if not self.subspace or n_positions < 2:
            return {}
        offset = trial.suggest_int("second_offset", 1, n_positions - 1)
        weight = trial.suggest_float("second_weight", 0.0, 1.0)
        if weight < MIN_SECOND_WEIGHT:
            return {}
        return {"second": (position + offset) % n_positions - n_positions, "second_weight": weight}


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
    model: nn.Module,
    adapter: Adapter,
    encoded: EncodedPrompts,
    points: list[EditPoint],
    directions: torch.Tensor,
) -> torch.Tensor:
    """Last-position logits ``[n_points, n_prompts, vocab]`` with each point's edit hooked on its rows.

    Args:
        directions: ``[n_points, 2, d_model]``: each point's basis (``padded_bases``).
    """
    copies = len(points)

    @contextmanager
    def hooks(rows: int, prefix: bool) -> Iterator[None]:
        per_copy = rows // copies
        per_row = directions.repeat_interleave(per_copy, dim=0)

        def scales_of(writer: ResolvedWriter) -> torch.Tensor:
            values = torch.tensor([_padded_scales(point, writer) for point in points], dtype=torch.float32)
            return values.repeat_interleave(per_copy, dim=0)

        with ablated(model, adapter, subspace_projection(per_row, scales_of)):
            yield

    return copied_last_logits(model, encoded, hooks, copies)


def padded_bases(points: list[EditPoint], space: SearchSpace) -> torch.Tensor:
    """``[n_points, 2, d_model]``: each point's direction, with a zero second row for rank-1 points."""
    bases = []
    for point in points:
        direction = point_direction(point, space.candidates, space.harmless_means)
        bases.append(
            direction if direction.dim() == 2 else torch.stack([direction, torch.zeros_like(direction)])
        )
    return torch.stack(bases)


def _padded_scales(point: EditPoint, writer: ResolvedWriter) -> tuple[float, float]:
    scales = point.strength_of(writer)
    return (scales, 0.0) if isinstance(scales, float) else scales


def score_points(
    model: nn.Module, adapter: Adapter, space: SearchSpace, data: SearchData, points: list[EditPoint]
) -> list[TrialScore]:
    """Cheap scores of ``points``, all in the same forward passes."""
    directions = padded_bases(points, space)
    harmful = batched_logits(model, adapter, data.harmful, points, directions)
    harmless = batched_logits(model, adapter, data.harmless, points, directions)
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


Confirm = Callable[[EditPoint, torch.Tensor], tuple[int, int, float]]


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


def warm_starts(space: SearchSpace) -> list[dict[str, object]]:
    """The trials evaluated before the sampler's own: the paper's point first, then the points the
    issue's hook measurements on the demo found best at low KL (the direction ⊥ the harmless mean; a
    second EOI position's direction at weight 0.25; both; a profile that fades the late writers; and
    uniform strengths below 1), so TPE starts from what is known instead of rediscovering it."""
    anchor = space.anchor
    paper = {
        "layer": anchor.layer,
        "position": anchor.position,
        "orthogonal": anchor.orthogonal,
        "embedding": 1.0,
        "attention": 1.0,
        "mlp": 1.0,
        "peak": 0.0,
        "width": 0.0,
    }
    n_positions = space.candidates.shape[0]
    if space.subspace and n_positions > 1:
        paper.update(second_offset=n_positions - 1, second_weight=0.0)  # offset n − 1: position − 1
    orthogonal = {**paper, "orthogonal": True}
    starts = [paper, orthogonal]
    starts.append({**orthogonal, "peak": anchor.layer, "width": float(space.n_layers)})
    if "second_weight" in paper:
        starts += [{**paper, "second_weight": 0.25}, {**orthogonal, "second_weight": 0.25}]
    # A uniform strength below 1 trades refusals for KL smoothly (0.9: KL 0.076 → 0.062 at the same
    # 1/32 refusals on the demo, benchmarks/edit_levers.py).
    for strength in (0.85, 0.75):
        uniform = {"embedding": strength, "attention": strength, "mlp": strength}
        starts += [{**paper, **uniform}, {**orthogonal, **uniform}]
    return starts


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
        direction = point_direction(trial.point, space.candidates, space.harmless_means)
        refusals, n, kl = confirm(trial.point, direction)
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


def strength_function(point: EditPoint | None) -> Callable[[ResolvedWriter], Strength] | None:
    """What the fold and the hooks are given for a chosen point (``None``: strength 1 everywhere)."""
    return None if point is None else point.strength_of


def is_norm_preserving(point: EditPoint | None) -> bool:
    """Whether the fold and the hooks of a chosen point are the norm-preserving ones."""
    return point is not None and point.norm_preserving
