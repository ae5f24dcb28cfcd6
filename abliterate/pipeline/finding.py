"""Which direction: extraction of the candidates, the paper's selection, and the search around it."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from abliterate.config import RunConfig
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.direction import unit_direction
from abliterate.find.evaluate import refusal_rate
from abliterate.find.extract import candidate_directions, extract_means
from abliterate.find.judge import refusal_count
from abliterate.find.point import EditPoint, point_direction
from abliterate.find.scores import kl_divergence, refusal_token_ids
from abliterate.find.search import Confirm, SearchData, SearchResult, SearchSettings, search_edit
from abliterate.find.select import RefusalDirection, direction_at, select_direction
from abliterate.find.space import SearchSpace
from abliterate.model.batching import EncodedPrompts, last_logits
from abliterate.model.hooks import ablated, edit_projection
from abliterate.pipeline.evaluation import generation_options
from abliterate.pipeline.subject import Inputs, Subject


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
    harmful, harmless = inputs.harmful, inputs.harmless
    chosen = select_direction(
        subject.model,
        subject.adapter,
        candidates,
        subject.encoded(harmful.val),
        subject.encoded(harmless.val),
        subject.encoded(harmful.val[: config.selection.screen_prompts]),
        refusal_token_ids(subject.tokenizer),
        harmless_screen=subject.encoded(harmless.val[: config.selection.screen_prompts]),
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
    # The trials' KL is measured on every harmless val prompt, the same prompts the choice is judged on:
    # KL is heavy-tailed over prompts, and on 8 of them it read half the 32-prompt value on the demo.
    confirm_harmless = subject.encoded(inputs.harmless.val)
    reference = last_logits(model, adapter, confirm_harmless)[0]
    data = SearchData(
        subject.encoded(inputs.harmful.val[: config.search.search_prompts]),
        confirm_harmless,
        reference,
        refusal_token_ids(subject.tokenizer),
    )
    anchor = EditPoint.paper(
        chosen.layer, chosen.position, config.selection.project_harmless, config.selection.norm_preserving
    )
    space = SearchSpace(
        candidates, harmless_means, subject.n_layers, anchor, norm_preserving=config.selection.norm_preserving
    )
    per_forward = max(1, subject.batch_size // config.search.search_prompts)
    settings = SearchSettings(
        config.search.trials,
        config.search.search_budget,
        per_forward,
        config.search.finalists,
        config.search_max_kl,
        config.prompts.seed,
    )
    confirm = _confirmation(config, subject, inputs, confirm_harmless, reference)
    result = search_edit(model, adapter, space, data, confirm, settings)
    return _with_search(chosen, result, anchor, candidates, harmless_means)


def _confirmation(
    config: RunConfig, subject: Subject, inputs: Inputs, harmless: EncodedPrompts, reference: torch.Tensor
) -> Confirm:
    """How a finalist is confirmed, with its edit hooked: refusals among greedy replies to every harmful
    val prompt (counted by the judge), and the mean first-token KL from ``reference`` on ``harmless``."""
    model, adapter = subject.model, subject.adapter

    def confirm(edit: DeclaredEdit) -> tuple[int, int, float]:
        with ablated(model, adapter, edit_projection(edit)):
            replies = refusal_rate(
                model, subject.tokenizer, inputs.harmful.val, **generation_options(config, subject)
            ).replies
            logits = last_logits(model, adapter, harmless)[0]
        return refusal_count(replies), len(replies), kl_divergence(reference, logits).mean().item()

    return confirm


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
