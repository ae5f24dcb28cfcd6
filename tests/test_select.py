"""Selection picks what the method says, and the prompt-efficient batching changes no number."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import make_model, make_tokenizer

from abliterate.adapters.resolve import resolve_adapter
from abliterate.find.extract import extract_candidates
from abliterate.find.scores import refusal_scores, refusal_token_ids
from abliterate.find.select import select_direction
from abliterate.model.batching import encode, eoi_length, forward_batches, last_logits
from abliterate.model.hooks import ablated, projection
from abliterate.model.prompts import bundled


def _setup() -> tuple:
    model, tokenizer = make_model("qwen2", seed=3), make_tokenizer()
    tokenizer.padding_side = "left"
    adapter = resolve_adapter(model)
    n_eoi = eoi_length(tokenizer)
    harmful, harmless = bundled("harmful", "train")[:12], bundled("harmless", "train")[:12]
    candidates = extract_candidates(
        model,
        adapter,
        encode(tokenizer, harmful, batch_size=5, keep_last=n_eoi),
        encode(tokenizer, harmless, batch_size=5, keep_last=n_eoi),
        n_eoi,
        progress=False,
    )
    return model, tokenizer, adapter, n_eoi, candidates


def test_prefix_cache_and_batching_match_single_prompt_forwards() -> None:
    model, tokenizer, adapter, n_eoi, candidates = _setup()
    prompts = bundled("harmful", "val")[:5]
    encoded = encode(tokenizer, prompts, batch_size=2, keep_last=n_eoi)
    assert encoded.prefix.shape[1] > 0, "the chat template's shared prefix should be split off"
    direction = torch.nn.functional.normalize(candidates[-1, 1].float(), dim=0)
    batched = last_logits(model, adapter, encoded, ablate=direction[None])[0]
    for row, index in enumerate(encoded.order):
        single = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompts[index]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad(), ablated(model, adapter, projection(direction)):
            expected = model(**single).logits[0, -1]
        assert torch.allclose(batched[row], expected, atol=1e-4), row


def test_several_directions_per_forward_equal_one_at_a_time() -> None:
    model, tokenizer, adapter, n_eoi, candidates = _setup()
    encoded = encode(tokenizer, bundled("harmful", "val")[:3], batch_size=8, keep_last=n_eoi)
    directions = torch.nn.functional.normalize(candidates[:, 2].float(), dim=-1)
    together = last_logits(model, adapter, encoded, ablate=directions)
    for index in range(directions.shape[0]):
        alone = last_logits(model, adapter, encoded, ablate=directions[index : index + 1])[0]
        assert torch.allclose(together[index], alone, atol=1e-4)
    assert not torch.allclose(together[0], together[1], atol=1e-3), "directions had no effect"


def test_selection_is_the_exhaustive_argmin_when_nothing_is_screened_out() -> None:
    model, tokenizer, adapter, n_eoi, candidates = _setup()
    val = encode(tokenizer, bundled("harmful", "val")[:4], batch_size=8, keep_last=n_eoi)
    harmless = encode(tokenizer, bundled("harmless", "val")[:4], batch_size=8, keep_last=n_eoi)
    refusal_ids = refusal_token_ids(tokenizer)
    chosen = select_direction(
        model,
        adapter,
        candidates,
        val,
        harmless,
        val,
        refusal_ids,
        max_kl=math.inf,
        min_steering=-math.inf,
        screen_keep=10_000,
        layer_stride=1,
        progress=False,
    )
    n_positions, n_layers, _ = candidates.shape
    best = None
    for layer in range(n_layers):
        if layer >= 0.8 * n_layers:
            continue
        for pos in range(n_positions):
            unit = torch.nn.functional.normalize(candidates[pos, layer].float(), dim=0)
            score = refusal_scores(last_logits(model, adapter, val, ablate=unit[None])[0], refusal_ids).mean()
            if best is None or score < best[0]:
                best = (score.item(), pos - n_positions, layer)
    assert (chosen.position, chosen.layer) == (best[1], best[2])
    assert abs(chosen.ablation_score - best[0]) < 1e-6
    assert chosen.layer < 0.8 * n_layers


def test_kl_filter_rejects_and_the_error_says_what_to_do() -> None:
    model, tokenizer, adapter, n_eoi, candidates = _setup()
    val = encode(tokenizer, bundled("harmful", "val")[:3], batch_size=8, keep_last=n_eoi)
    harmless = encode(tokenizer, bundled("harmless", "val")[:3], batch_size=8, keep_last=n_eoi)
    try:
        select_direction(
            model,
            adapter,
            candidates,
            val,
            harmless,
            val,
            refusal_token_ids(tokenizer),
            max_kl=0.0,
            progress=False,
        )
    except LookupError as error:
        assert "--layer" in str(error)
    else:
        raise AssertionError("a KL bound of 0 must reject every candidate")


def test_extraction_equals_hidden_states_mean() -> None:
    model, tokenizer, adapter, n_eoi, _ = _setup()
    prompts = bundled("harmful", "train")[:6]
    encoded = encode(tokenizer, prompts, batch_size=4, keep_last=n_eoi)
    from abliterate.find.extract import mean_block_inputs

    means = mean_block_inputs(model, adapter, encoded, n_eoi, 4, progress=False)
    expected = []
    for prompt in prompts:
        single = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            states = model(**single, output_hidden_states=True).hidden_states[:4]
        expected.append(torch.stack([state[0, -n_eoi:] for state in states], dim=1))
    assert torch.allclose(means, torch.stack(expected).double().mean(0), atol=1e-5)
    assert all(logits is None for logits in forward_batches(model, encoded, logits=False))


def test_projected_candidates_are_orthogonal_to_the_harmless_mean() -> None:
    from abliterate.find.extract import candidate_directions

    generator = torch.Generator().manual_seed(0)
    harmful, harmless = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64).unbind(0)
    harmful, harmless = harmful[None], harmless[None]
    plain = candidate_directions(harmful, harmless)
    projected = candidate_directions(harmful, harmless, project_harmless=True)
    assert torch.allclose(plain, harmful - harmless)
    cosine = torch.nn.functional.cosine_similarity(projected, harmless, dim=-1)
    assert cosine.abs().max() < 1e-12
    assert torch.nn.functional.cosine_similarity(plain, harmless, dim=-1).abs().max() > 1e-3
    # What is left is the plain candidate minus only its harmless-mean component.
    residual = plain - projected
    assert torch.nn.functional.cosine_similarity(residual, harmless, dim=-1).abs().min() > 1 - 1e-9


def test_paper_selection_scores_the_first_val_prompts_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A val split grown for the search's trials and confirmations leaves the paper's point as it was:
    selection scores the first ``select_prompts`` of each class, whatever ``--n-val`` holds; the search
    confirms from the split's other end."""
    from types import SimpleNamespace

    from abliterate import RunConfig
    from abliterate.pipeline import finding
    from abliterate.pipeline.finding import confirmation_prompts, paper_direction

    seen: dict[str, list[str]] = {}

    def fake_select(
        model: object, adapter: object, candidates: object, harmful: list, harmless: list, *a, **k
    ):
        seen.update(harmful=harmful, harmless=harmless, screen=a[0])
        return finding.direction_at(torch.ones(1, 2, 4), 1, -1)

    monkeypatch.setattr(finding, "select_direction", fake_select)
    monkeypatch.setattr(finding, "refusal_token_ids", lambda tokenizer: [0])
    val = [f"prompt {index}" for index in range(150)]
    splits = SimpleNamespace(val=val)
    inputs = SimpleNamespace(harmful=splits, harmless=splits)
    subject = SimpleNamespace(
        model=None, adapter=None, tokenizer=None, batch_size=8, n_layers=2, encoded=lambda prompts: prompts
    )
    config = RunConfig.from_options("demo", output="/tmp/unused", n_val=150, select_prompts=32)
    paper_direction(config, subject, inputs, torch.ones(1, 2, 4))
    assert seen["harmful"] == val[:32] and seen["harmless"] == val[:32]
    assert seen["screen"] == val[: config.selection.screen_prompts]
    confirming = confirmation_prompts(val, 128)
    assert confirming[:32] == val[-32:][::-1]  # the first, eliminating stage: prompts the trials never see
    assert not set(confirming[:32]) & set(val[: config.search.trial_prompts])
