"""Choose the candidate whose ablation removes refusal best (Arditi et al. 2024, with a cheaper search).

Scores per candidate r̂ = c / |c|:
- ablation score: mean refusal score on harmful val prompts with r̂ projected out everywhere;
- steering score: mean refusal score on harmless val prompts with c added at its layer;
- KL: first-token KL(original ‖ ablated) on harmless val prompts.
The paper discards NaN, layer ≥ 0.8·n_layers, KL > 0.1 and steering < 0, then takes the lowest
ablation score. We compute the same choice with less work: a coarse ablation screen on a few prompts
keeps the best ``screen_keep`` candidates, those get the full ablation score, and KL and steering are
computed lazily in ablation order until the first candidate passes every filter. The screen itself
visits every second layer, then the layers next to the best candidates, and also measures KL on a few
harmless prompts so candidates that clearly damage the model are scored last.

``select_direction`` composes plain functions over one ``CandidateScores`` (``abliterate.find.scores``):
``eligible_candidates`` → ``screen_candidates`` → ``score_candidates`` → ``pick_candidate`` (the paper's
rule over the scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from abliterate.adapters.spec import Adapter
from abliterate.edit.direction import unit_rows
from abliterate.find.point import EditPoint
from abliterate.find.scores import CandidateScores, Pair, Scorer, ablation_pass, kl_divergence, refusal_scores
from abliterate.find.search import SearchResult
from abliterate.model.batching import EncodedPrompts, last_logits


@dataclass(frozen=True)
class RefusalDirection:
    """The chosen direction and how it was found.

    Attributes:
        direction: unit vector ``[d_model]``, float32, on the CPU.
        layer: block whose input it was measured at.
        position: EOI position, negative from the end (``-1`` = last token).
        ablation_score: mean refusal score on harmful prompts with it ablated.
        steering_score: mean refusal score on harmless prompts with it added.
        kl: first-token KL on harmless prompts with it ablated.
        scores: ``{"ablation", "steering", "kl", "screen"}`` → ``[n_positions, n_layers]`` (NaN = not
            computed) for plots and the manifest.
        edit_point: the searched edit (direction options and per-writer strengths); ``None`` is the
            paper's edit, strength 1 on every writer.
        search: the search's record (every trial, the Pareto front, the finalists), or ``None``.
    """

    direction: torch.Tensor
    layer: int
    position: int
    ablation_score: float = math.nan
    steering_score: float = math.nan
    kl: float = math.nan
    scores: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    edit_point: EditPoint | None = None
    search: SearchResult | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SelectionConstraints:
    """The filters a candidate must pass (all of them config fields).

    Attributes:
        max_layer_fraction: discard candidates at layer ≥ this fraction of the depth.
        max_kl: discard candidates whose harmless first-token KL exceeds this.
        min_steering: discard candidates whose steering score is not above this; ``None`` means the
            unsteered harmless score, which ``select_direction`` fills in before scoring: adding the
            candidate must raise the harmless prompts' refusal score. The paper's absolute threshold 0
            (p(refusal) ≥ ½) is unreachable for small models whose refusals themselves score below 0
            (the demo model: −0.65 on harmful prompts).
    """

    max_layer_fraction: float = 0.8
    max_kl: float = 0.1
    min_steering: float | None = None


def select_direction(
    model: nn.Module,
    adapter: Adapter,
    candidates: torch.Tensor,
    harmful_val: EncodedPrompts,
    harmless_val: EncodedPrompts,
    harmful_screen: EncodedPrompts,
    refusal_ids: list[int],
    harmless_screen: EncodedPrompts | None = None,
    *,
    max_layer_fraction: float = 0.8,
    max_kl: float = 0.1,
    min_steering: float | None = None,
    screen_keep: int = 6,
    batch_size: int = 32,
    n_layers: int | None = None,
    layer_stride: int = 2,
    progress: bool = True,
) -> RefusalDirection:
    """Pick the candidate with the lowest ablation score among those that pass every filter.

    Args:
        model: the causal LM.
        adapter: its architecture description.
        candidates: ``[n_positions, n_layers, d_model]`` from ``extract_candidates``.
        harmful_val: harmful validation prompts (ablation score).
        harmless_val: harmless validation prompts (steering score and KL).
        harmful_screen: a few harmful prompts for the coarse screen.
        refusal_ids: refusal first-token ids.
        harmless_screen: a few harmless prompts on which the screen also measures KL, so candidates
            that clearly break the model (screen KL above twice ``max_kl``) are scored last.
        max_layer_fraction: discard candidates at layer ≥ this fraction of the depth.
        max_kl: discard candidates whose harmless KL exceeds this.
        min_steering: discard candidates whose steering score is not above this; ``None`` (default):
            above the unsteered harmless score (see ``SelectionConstraints``).
        screen_keep: candidates kept after the screen.
        batch_size: rows per forward; several candidates share a forward when prompts are few.
        n_layers: depth of the model (default: the candidates' layer count); extraction may stop
            early, so the candidates can cover fewer layers than the model has.
        layer_stride: screen every ``layer_stride``-th layer first, then those beside the best (1: all).
        progress: show progress bars.

    Returns:
        The chosen direction with all computed scores.

    Raises:
        LookupError: no candidate passes the filters.
    """
    n_layers = n_layers or candidates.shape[1]
    units = unit_rows(candidates).float()
    scorer = Scorer(model, adapter, candidates, units, refusal_ids, batch_size, progress)
    scores = CandidateScores.unscored(*candidates.shape[:2])
    constraints = SelectionConstraints(max_layer_fraction, max_kl, min_steering)
    eligible = eligible_candidates(candidates, n_layers, max_layer_fraction)
    ranked = screen_candidates(
        scorer, scores, eligible, harmful_screen, harmless_screen, constraints, screen_keep, layer_stride
    )
    baseline, constraints = _unsteered(scorer, harmless_val, constraints)
    score_candidates(scorer, scores, ranked, harmful_val, harmless_val, baseline, constraints, screen_keep)
    return pick_candidate(scorer.units, scores, constraints, n_layers)


def _unsteered(
    scorer: Scorer, harmless_val: EncodedPrompts, constraints: SelectionConstraints
) -> tuple[torch.Tensor, SelectionConstraints]:
    """The unedited model's last-position logits on ``harmless_val`` (the KL reference), and
    ``constraints`` with an unset ``min_steering`` filled in as those prompts' mean refusal score."""
    baseline = last_logits(scorer.model, scorer.adapter, harmless_val)[0]
    if constraints.min_steering is None:
        unsteered = refusal_scores(baseline, scorer.refusal_ids).mean().item()
        constraints = replace(constraints, min_steering=unsteered)
    return baseline, constraints


def eligible_candidates(candidates: torch.Tensor, n_layers: int, max_layer_fraction: float) -> list[Pair]:
    """The candidates worth scoring: below the layer limit, with a finite, non-zero norm.

    A zero candidate (e.g. at the embedding, where both prompt sets end in the same EOI tokens) has no
    direction: it would only score NaN, so it is not scored at all.
    """
    n_positions, n_extracted, _ = candidates.shape
    norms = candidates.norm(dim=-1)
    return [
        (pos, layer)
        for layer in range(n_extracted)
        if layer < max_layer_fraction * n_layers
        for pos in range(n_positions)
        if torch.isfinite(norms[pos, layer]) and norms[pos, layer] > 0
    ]


def screen_candidates(
    scorer: Scorer,
    scores: CandidateScores,
    eligible: list[Pair],
    harmful_screen: EncodedPrompts,
    harmless_screen: EncodedPrompts | None,
    constraints: SelectionConstraints,
    screen_keep: int,
    layer_stride: int,
) -> list[Pair]:
    """Screen the candidates cheaply and return all eligible ones, most promising first.

    Neighbouring layers give similar candidates: every ``layer_stride``-th layer is screened, then the
    skipped layers next to the best screened candidates. The order is by screen score, with candidates
    whose screen KL already breaks the bound (over ``2 · constraints.max_kl``) after those, and unscreened
    ones last.
    """
    reference = None
    if harmless_screen is not None:
        reference = last_logits(scorer.model, scorer.adapter, harmless_screen)[0]

    def screen(pairs: list[Pair]) -> None:
        ablation_pass(scorer, harmful_screen, pairs, scores.screen, "screen")
        if harmless_screen is not None:
            ablation_pass(scorer, harmless_screen, pairs, scores.screen_kl, "screen kl", reference)

    def screen_order(pair: Pair) -> tuple[bool, bool, float]:
        unscreened = math.isnan(scores.screen[pair])
        breaks_model = bool(scores.screen_kl[pair] > 2 * constraints.max_kl)
        return unscreened, breaks_model, _sort_key(scores.screen[pair])

    coarse = [pair for pair in eligible if pair[1] % layer_stride == 0]
    screen(coarse)
    best = sorted(coarse, key=screen_order)[: max(1, screen_keep // 2)]
    neighbours = {
        (pos, layer + step)
        for pos, layer in best
        for step in range(1 - layer_stride, layer_stride)
        if step and (pos, layer + step) in eligible and (pos, layer + step) not in coarse
    }
    screen(sorted(neighbours))
    return sorted(eligible, key=screen_order)


def score_candidates(
    scorer: Scorer,
    scores: CandidateScores,
    ranked: list[Pair],
    harmful_val: EncodedPrompts,
    harmless_val: EncodedPrompts,
    baseline: torch.Tensor,
    constraints: SelectionConstraints,
    screen_keep: int,
) -> None:
    """Full scores, ``screen_keep`` candidates at a time in ``ranked`` order, until one passes.

    Each group gets its ablation scores; then, in ablation order, KL and steering are computed lazily
    (``_score_filters``), so scoring stops at the first candidate that passes every filter: the one
    ``pick_candidate`` then finds.

    Args:
        baseline: unablated last-position logits on ``harmless_val`` (the KL reference).
        constraints: the filters, ``min_steering`` filled in.
    """
    for start in range(0, len(ranked), screen_keep):
        group = ranked[start : start + screen_keep]
        ablation_pass(scorer, harmful_val, group, scores.ablation, "ablation")
        by_ablation = sorted(group, key=lambda pair: _sort_key(scores.ablation[pair]))
        for pair in tqdm(by_ablation, desc="select: filters", unit="cand", disable=not scorer.progress):
            if _score_filters(scorer, scores, pair, harmless_val, baseline, constraints):
                return


def _score_filters(
    scorer: Scorer,
    scores: CandidateScores,
    pair: Pair,
    harmless_val: EncodedPrompts,
    baseline: torch.Tensor,
    constraints: SelectionConstraints,
) -> bool:
    """Compute KL, then steering, for one candidate, each only if everything before it passed."""
    if math.isnan(scores.ablation[pair].item()):
        return False
    model, adapter = scorer.model, scorer.adapter
    ablated = last_logits(model, adapter, harmless_val, ablate=scorer.units[pair][None])[0]
    kl = kl_divergence(baseline, ablated).mean().item()
    scores.kl[pair] = kl
    if not kl <= constraints.max_kl:
        return False
    layer = pair[1]
    steered = last_logits(model, adapter, harmless_val, steer=(scorer.candidates[pair].float(), layer))[0]
    steering = refusal_scores(steered, scorer.refusal_ids).mean().item()
    scores.steering[pair] = steering
    return steering > constraints.min_steering


def pick_candidate(
    units: torch.Tensor, scores: CandidateScores, constraints: SelectionConstraints, n_layers: int
) -> RefusalDirection:
    """The paper's rule over the scores: the lowest ablation score among candidates passing every filter.

    Unscored (NaN) values fail every filter, so only fully scored candidates can be chosen.

    Args:
        units: ``[n_positions, n_layers, d_model]`` unit candidates.
        scores: what was computed (``score_candidates`` stops at the first candidate that passes).
        constraints: the filters, ``min_steering`` filled in.
        n_layers: depth of the model, for the layer limit.

    Raises:
        LookupError: no candidate passes.
    """
    assert constraints.min_steering is not None, "min_steering is filled in before picking"
    n_positions, n_extracted = scores.ablation.shape
    below_limit = torch.arange(n_extracted) < constraints.max_layer_fraction * n_layers
    passing = (
        ~scores.ablation.isnan()
        & (scores.kl <= constraints.max_kl)
        & (scores.steering > constraints.min_steering)
        & below_limit
    )
    if not passing.any():
        raise LookupError(
            f"no candidate passed the filters (KL ≤ {constraints.max_kl}, "
            f"steering > {constraints.min_steering:.3g}, "
            f"layer < {constraints.max_layer_fraction:.0%} of {n_layers}); "
            f"relax them or give --layer and --position"
        )
    pos, layer = divmod(int(torch.where(passing, scores.ablation, math.inf).argmin()), n_extracted)
    return RefusalDirection(
        direction=units[pos, layer].clone(),
        layer=layer,
        position=pos - n_positions,
        ablation_score=scores.ablation[pos, layer].item(),
        steering_score=scores.steering[pos, layer].item(),
        kl=scores.kl[pos, layer].item(),
        scores=scores.as_dict(),
    )


def _sort_key(value: torch.Tensor) -> float:
    value = float(value)
    return math.inf if math.isnan(value) else value


def direction_at(candidates: torch.Tensor, layer: int, position: int) -> RefusalDirection:
    """The candidate at ``(position, layer)`` chosen by hand (``--layer/--position``), no scoring.

    Raises:
        ValueError: the layer or position is out of range.
    """
    n_positions, n_layers, _ = candidates.shape
    if not 0 <= layer < n_layers:
        raise ValueError(f"--layer {layer} is out of range: the model has {n_layers} layers")
    if not -n_positions <= position < n_positions:
        raise ValueError(f"--position {position} is out of range: there are {n_positions} EOI tokens")
    index = position % n_positions
    return RefusalDirection(
        direction=unit_rows(candidates[index, layer]).float().clone(),
        layer=layer,
        position=index - n_positions,
    )
