"""Multi-token KL over the original's own replies: zero for no edit, positive for a real one, equal to a
direct computation, and the stored-top-tokens form bounded by the hooked one."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tiny import make_model, make_tokenizer

from abliterate.adapters.resolve import resolve_adapter
from abliterate.edit.declared import DeclaredEdit
from abliterate.edit.walker import fold_direction
from abliterate.find import damage
from abliterate.find.damage import identity_ablation, multi_token_kl, record_reference
from abliterate.model.hooks import ablated, projection

PROMPTS = ["Write a poem about the sea.", "hi", "Explain gravity to a child, briefly.", "List three fruits."]


@pytest.fixture(scope="module")
def tiny(one_thread: None) -> tuple[torch.nn.Module, object]:
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"  # as loading.load_model sets it
    return make_model("qwen2"), tokenizer


def _reference(tiny: tuple[torch.nn.Module, object], **options: object):
    model, tokenizer = tiny
    return record_reference(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3, **options)


def test_identity_ablation_gives_zero(tiny: tuple[torch.nn.Module, object]) -> None:
    reference = _reference(tiny)
    summary = multi_token_kl(tiny[0], reference, identity_ablation)
    assert summary.n_prompts == len(PROMPTS) and summary.n_tokens == reference.n_tokens > len(PROMPTS)
    assert summary.mean == 0.0 and all(value == 0.0 for value in summary.per_prompt)


def test_a_real_ablation_gives_positive_kl(tiny: tuple[torch.nn.Module, object]) -> None:
    model, _ = tiny
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    summary = multi_token_kl(
        model, _reference(tiny), lambda: ablated(model, resolve_adapter(model), projection(direction))
    )
    assert summary.mean > 1e-4 and all(value > 0 for value in summary.per_prompt)


@contextmanager
def _logit_shift(model: torch.nn.Module, shift: torch.Tensor) -> Iterator[None]:
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output + shift)
    try:
        yield
    finally:
        handle.remove()


def test_equals_a_direct_computation(tiny: tuple[torch.nn.Module, object]) -> None:
    """Hand-built: the edit adds a fixed vector to the logits; KL is recomputed position by position
    from full unpadded forwards of each prompt with its reply."""
    model, _tokenizer = tiny
    shift = torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(2))
    reference = _reference(tiny)
    summary = multi_token_kl(model, reference, lambda: _logit_shift(model, shift), batch_size=2)
    expected = []
    for batch in reference.batches:
        for row in range(batch.input_ids.shape[0]):
            real = batch.attention_mask[row].bool()
            ids = batch.input_ids[row][real][None]
            scored = batch.scored[row][real]
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0][scored]
            values = []
            for position in logits.double():
                p = torch.softmax(position, -1)
                q = torch.softmax(position + shift.double(), -1)
                values.append(float((p * (p.log() - q.log())).sum()))
            expected.append(sum(values) / len(values))
    assert summary.per_prompt == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert summary.mean == pytest.approx(sum(expected) / len(expected), rel=1e-3)


def test_replies_stop_at_end_of_sequence(tiny: tuple[torch.nn.Module, object]) -> None:
    """A reply that ends early is scored up to its end token only, never over padding."""
    _model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    reference = _reference(tiny)
    for batch in reference.batches:
        for row in range(batch.input_ids.shape[0]):
            tokens = batch.input_ids[row, batch.prompt_length :]
            scored = int(batch.scored[row].sum())
            stops = (tokens == eos).nonzero()
            expected = int(stops[0]) + 1 if len(stops) else tokens.shape[0]
            assert scored == expected


def test_a_separate_edited_model_with_stored_top_tokens(tiny: tuple[torch.nn.Module, object]) -> None:
    """Without hooks, the edited checkpoint is compared with the original's stored top tokens: with the
    whole vocabulary kept it equals the hooked KL; with a few it is a lower bound; the original itself
    scores 0 (negative control)."""
    model, _tokenizer = tiny
    adapter = resolve_adapter(model)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    hooked = multi_token_kl(model, _reference(tiny), lambda: ablated(model, adapter, projection(direction)))
    edited = copy.deepcopy(model)
    fold_direction(edited, resolve_adapter(edited), DeclaredEdit(direction / direction.norm()))
    full = multi_token_kl(edited, _reference(tiny, keep_top=model.config.vocab_size))
    assert full.per_prompt == pytest.approx(hooked.per_prompt, rel=1e-3, abs=1e-6)
    few = multi_token_kl(edited, _reference(tiny, keep_top=4))
    assert all(low <= high + 1e-6 for low, high in zip(few.per_prompt, full.per_prompt, strict=True))
    assert few.mean > 0
    assert multi_token_kl(model, _reference(tiny, keep_top=4)).mean == pytest.approx(0.0, abs=1e-6)


def test_without_ablation_needs_stored_top_tokens(tiny: tuple[torch.nn.Module, object]) -> None:
    with pytest.raises(ValueError, match="keep_top"):
        multi_token_kl(tiny[0], _reference(tiny))
    with pytest.raises(ValueError):
        record_reference(tiny[0], tiny[1], [], max_new_tokens=4)


def test_a_pass_of_bounded_size_gives_the_same_figures(
    tiny: tuple[torch.nn.Module, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a logits budget of one row per pass (it bounds the memory of the 152k-vocabulary demo's
    teacher-forced passes), the stored top tokens and both KL figures are those of whole batches."""
    model, _tokenizer = tiny
    adapter = resolve_adapter(model)
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    edited = copy.deepcopy(model)
    fold_direction(edited, resolve_adapter(edited), DeclaredEdit(direction / direction.norm()))

    def figures() -> tuple[list[float], list[float], torch.Tensor]:
        reference = _reference(tiny, keep_top=8)
        hooked = multi_token_kl(model, reference, lambda: ablated(model, adapter, projection(direction)))
        stored = multi_token_kl(edited, reference)
        return hooked.per_prompt, stored.per_prompt, torch.cat([b.top_ids for b in reference.batches])

    whole = figures()
    first = _reference(tiny).batches[0]
    positions = first.input_ids.shape[1] - first.prompt_length + 1
    monkeypatch.setattr(damage, "LOGITS_BYTES", 4 * model.config.vocab_size * positions)
    assert damage._rows_per_pass(model, first) == 1 < first.input_ids.shape[0]
    cut = figures()
    assert cut[0] == pytest.approx(whole[0], rel=1e-4, abs=1e-7)
    assert cut[1] == pytest.approx(whole[1], rel=1e-4, abs=1e-7)
    assert torch.equal(cut[2], whole[2])
