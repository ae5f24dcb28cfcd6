"""Which direction: extraction of the candidates, the paper's selection, and the search around it."""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from dataclasses import replace

import torch

from abliterate.config import RunConfig
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_direction
from abliterate.find.confirm import Confirmer, ConfirmSettings
from abliterate.find.damage import multi_token_kl, record_reference
from abliterate.find.evaluate import generate_replies
from abliterate.find.extract import candidate_directions, extract_means
from abliterate.find.judge import not_helped
from abliterate.find.point import EditPoint, point_direction
from abliterate.find.scores import kl_divergence, refusal_token_ids
from abliterate.find.search import SearchData, SearchResult, SearchSettings, search_edit
from abliterate.find.select import RefusalDirection, direction_at, select_direction
from abliterate.find.space import SearchSpace
from abliterate.model.batching import last_logits
from abliterate.model.hooks import ablated, edit_projection
from abliterate.pipeline.evaluation import generation_options
from abliterate.pipeline.subject import Inputs, Subject

logger = logging.getLogger(__name__)


def candidates_and_means(
    config: RunConfig, subject: Subject, inputs: Inputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates ``[n_eoi, n_extracted, d_model]``: harmful minus harmless mean block inputs, and the
    harmless means (the search's directions may be made orthogonal to them).

    Selection never looks at layers past the fraction (or past ``--layer``), so the forward passes stop
    there and ``n_extracted`` may be less than the model's depth.
    """
    if config.selection.layer is None:
        limit = min(
            subject.n_layers, max(1, math.ceil(config.selection.max_layer_fraction * subject.n_layers))
        )
    else:
        limit = min(subject.n_layers, config.selection.layer + 1)
    prompts = {
        "harmful": subject.encoded(inputs.harmful.train),
        "harmless": subject.encoded(inputs.harmless.train),
    }
    means = extract_means(
        subject.model, subject.adapter, prompts, subject.n_eoi, limit, progress=config.progress
    )
    candidates = candidate_directions(means["harmful"], means["harmless"], config.selection.project_harmless)
    return candidates, means["harmless"]


def paper_direction(
    config: RunConfig, subject: Subject, inputs: Inputs, candidates: torch.Tensor
) -> RefusalDirection:
    """The candidate given by ``--layer/--position``, or the one the search selects."""
    if config.selection.layer is not None:
        return _as_stored(direction_at(candidates, config.selection.layer, config.selection.position))
    # The paper's rule scores on the first val prompts only (as many as it always has): a larger val
    # split serves the search's trials and confirmations without changing the paper's point.
    harmful = inputs.harmful.val[: config.selection.select_prompts]
    harmless = inputs.harmless.val[: config.selection.select_prompts]
    chosen = select_direction(
        subject.model,
        subject.adapter,
        candidates,
        subject.encoded(harmful),
        subject.encoded(harmless),
        subject.encoded(harmful[: config.selection.screen_prompts]),
        refusal_token_ids(subject.tokenizer),
        harmless_screen=subject.encoded(harmless[: config.selection.screen_prompts]),
        max_layer_fraction=config.selection.max_layer_fraction,
        max_kl=config.selection_max_kl,
        min_steering=config.selection.min_steering,
        screen_keep=config.selection.screen_keep,
        batch_size=subject.batch_size,
        n_layers=subject.n_layers,
        layer_stride=config.selection.layer_stride,
        progress=config.progress,
    )
    return _as_stored(chosen)


def searched_direction(
    config: RunConfig,
    subject: Subject,
    inputs: Inputs,
    candidates: torch.Tensor,
    harmless_means: torch.Tensor,
    chosen: RefusalDirection,
) -> RefusalDirection:
    """Search the family of exact edits around the paper's choice (``abliterate.find.search``), on the
    validation split only; ``--search none`` or ``--layer/--position`` keep the paper's edit.

    Raises:
        ValueError: no confirmed point meets ``--max-kl`` (nothing is written).
    """
    if config.selection.search == "none" or config.selection.layer is not None:
        if config.selection.norm_preserving:  # the paper's candidate, folded norm-preserving
            point = EditPoint.paper(chosen.layer, chosen.position, config.selection.project_harmless, True)
            return replace(chosen, edit_point=point)
        return chosen
    model, adapter = subject.model, subject.adapter
    trial_harmless = subject.encoded(inputs.harmless.val[: config.search.kl_prompts])
    data = SearchData(
        subject.encoded(inputs.harmful.val[: config.search.trial_prompts]),
        trial_harmless,
        last_logits(model, adapter, trial_harmless)[0],
        refusal_token_ids(subject.tokenizer),
    )
    anchor = EditPoint.paper(
        chosen.layer, chosen.position, config.selection.project_harmless, config.selection.norm_preserving
    )
    space = SearchSpace(
        candidates, harmless_means, subject.n_layers, anchor, norm_preserving=config.selection.norm_preserving
    )
    per_forward = max(1, subject.batch_size // (config.search.trial_prompts + config.search.kl_prompts))
    search = config.search
    confirm = ConfirmSettings(
        config.search_max_kl,
        search.stage_prompts,
        search.survivors,
        search.drop_margin,
        search.max_increase,
        config.prompts.seed,
    )
    settings = SearchSettings(
        search.trials, search.search_budget, per_forward, search.finalists, confirm, config.prompts.seed
    )
    result = search_edit(model, adapter, space, data, confirmer(config, subject, inputs), settings)
    return _with_search(chosen, result, anchor, candidates, harmless_means)


def confirmation_prompts(prompts: list[str], count: int) -> list[str]:
    """The confirmation's prompts: ``count`` of the val split read from its end, so the first stage (the
    one that eliminates) is disjoint from the trials' prompts, read from its start, whenever the split
    holds both."""
    return prompts[::-1][:count]


def confirmer(config: RunConfig, subject: Subject, inputs: Inputs) -> Confirmer:
    """How a finalist is confirmed, its edit hooked on the original: greedy replies of
    ``--confirm-tokens`` to the harmful confirmation prompts, read by the judge; first-token KL on the
    harmless confirmation prompts and the multi-token KL over the original's greedy replies to some of
    them."""
    model, adapter, tokenizer = subject.model, subject.adapter, subject.tokenizer
    search = config.search
    harmful = confirmation_prompts(inputs.harmful.val, search.confirm_prompts)
    harmless_prompts = confirmation_prompts(inputs.harmless.val, search.confirm_prompts)
    if len(harmful) < search.confirm_prompts:
        logger.warning(
            "the search confirms on %d harmful val prompts, fewer than --confirm-prompts %d: its paired "
            "test against the paper's point has less power (raise --n-val or give more prompts)",
            len(harmful),
            search.confirm_prompts,
        )
    harmless = subject.encoded(harmless_prompts)
    reference = last_logits(model, adapter, harmless)[0]
    damage_reference = record_reference(
        model,
        tokenizer,
        harmless_prompts[: search.damage_prompts],
        max_new_tokens=search.damage_tokens,
        batch_size=subject.batch_size,
        chat=subject.replies,
    )
    options = generation_options(config, subject)
    options["max_new_tokens"] += search.confirm_tokens - config.evaluation.max_new_tokens

    def damage(edit: DeclaredEdit) -> tuple[float, float]:
        def hooks() -> AbstractContextManager:
            return ablated(model, adapter, edit_projection(edit))

        with hooks():
            logits = last_logits(model, adapter, harmless)[0]
        multi = multi_token_kl(model, damage_reference, hooks, batch_size=subject.batch_size)
        return kl_divergence(reference, logits).mean().item(), multi.mean

    def verdicts(edit: DeclaredEdit, start: int, stop: int) -> list[bool]:
        prompts = harmful[start:stop]
        with ablated(model, adapter, edit_projection(edit)):
            replies = generate_replies(model, tokenizer, prompts, description="search: confirm", **options)
        return [not_helped(reply, prompt) for reply, prompt in zip(replies, prompts, strict=True)]

    return Confirmer(damage, verdicts, len(harmful))


def _with_search(
    chosen: RefusalDirection,
    result: SearchResult,
    anchor: EditPoint,
    candidates: torch.Tensor,
    harmless_means: torch.Tensor,
) -> RefusalDirection:
    """``chosen`` with the search's record, and with the searched point's direction and scores unless the
    search kept the paper's plain point."""
    best = result.chosen
    if best.point == anchor and not anchor.norm_preserving:
        return replace(chosen, search=result)
    direction = point_direction(best.point, candidates, harmless_means)
    searched = replace(
        chosen,
        direction=direction,
        layer=min(round(best.point.layer), candidates.shape[1] - 1),
        position=best.point.position,
        ablation_score=best.refusal_score,
        kl=best.confirm_kl,
        edit_point=best.point,
        search=result,
    )
    return _as_stored(searched)


def _as_stored(chosen: RefusalDirection) -> RefusalDirection:
    """The direction exactly as ``direction.safetensors`` stores it (unit, float32), so the hooks, the
    fold and anyone re-applying or certifying the saved file all use the same bits."""
    return replace(chosen, direction=unit_direction(chosen.direction))
